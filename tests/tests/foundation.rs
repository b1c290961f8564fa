//! The pipeline from source to kernel: the real eBPF object, loaded by the
//! real agent, attached to a veth in a test namespace, counts real SMTP
//! connection attempts per source address, and a second process (this
//! test) reads the counts back from the pinned map.
use std::collections::HashMap as StdHashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData};
use socket2::{Domain, Socket, Type};
use tarpit_common::{IpAddrKey, maps::SYN_COUNT};
use tarpit_tests::hooks::xdp_prog_id;
use tarpit_tests::{Agent, PinDir, SERVER_V4, SERVER_V6, TestNet, require_root};

fn config(net: &TestNet, pins: &PinDir) -> String {
    format!(
        r#"
[listen]
addrs = ["127.0.0.1:2525"]
[backend]
addr = "127.0.0.1:2535"
[kernel]
interfaces = ["{iface}"]
smtp_ports = [25]
pin_path = "{pins}"
detach_on_exit = true
"#,
        iface = net.server_if,
        pins = pins.path.display()
    )
}

/// Opens `n` connections from `src` to `dst` (completing the handshake, so
/// no SYN is retransmitted) and closes them.
fn connect_from(net: &TestNet, src: IpAddr, dst: SocketAddr, n: usize) {
    net.in_client(|| {
        for _ in 0..n {
            let domain = if src.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            let s = Socket::new(domain, Type::STREAM, None).expect("socket");
            s.bind(&SocketAddr::new(src, 0).into())
                .expect("bind source");
            s.connect_timeout(&dst.into(), Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect {src} -> {dst}: {e}"));
        }
    })
    .expect("client namespace");
}

#[test]
fn syn_counts_per_source_address_read_from_pinned_map() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pin dir");
    let v4: IpAddr = "198.51.100.10".parse().unwrap();
    let v6: IpAddr = "fd5b:1e00::10".parse().unwrap();
    net.add_client_addr(v4).unwrap();
    net.add_client_addr(v6).unwrap();

    // Something listening on the SMTP port, so handshakes complete.
    let listener = net
        .in_server(|| {
            let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
            s.set_only_v6(false)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from(([0u16; 8], 25)).into())?;
            s.listen(128)?;
            Ok::<TcpListener, std::io::Error>(s.into())
        })
        .unwrap()
        .expect("listener on port 25");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });

    let agent = Agent::start(&net, &config(&net, &pins)).expect("agent starts");
    let prog_id = xdp_prog_id(&net).expect("XDP program attached to the server veth");

    connect_from(&net, v4, SocketAddr::from((SERVER_V4, 25)), 3);
    connect_from(&net, v6, SocketAddr::from((SERVER_V6, 25)), 5);
    // A port that is not SMTP is not counted.
    let _ = net.in_client(|| {
        let _ = std::net::TcpStream::connect_timeout(
            &SocketAddr::from((SERVER_V4, 26)),
            Duration::from_secs(1),
        );
    });

    // Read back from the pin, in this process: not the agent's.
    let data = MapData::from_pin(pins.path.join(SYN_COUNT)).expect("pinned SYN_COUNT");
    let map = Map::from_map_data(data).expect("map");
    let counts: HashMap<_, IpAddrKey, u64> = HashMap::try_from(map).expect("hash map");
    let got: StdHashMap<IpAddr, u64> = counts
        .iter()
        .map(|r| r.expect("entry"))
        .map(|(k, v)| (IpAddr::from(k), v))
        .collect();
    assert_eq!(got.get(&v4), Some(&3), "IPv4 count; map: {got:?}");
    assert_eq!(got.get(&v6), Some(&5), "IPv6 count; map: {got:?}");
    assert_eq!(got.len(), 2, "only the two sources were counted: {got:?}");

    // Ctrl-C/SIGTERM with detach_on_exit: nothing of ours is left.
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "agent exit status {status}");
    assert_eq!(xdp_prog_id(&net), None, "XDP still attached after exit");
    let still_loaded = Command::new("bpftool")
        .args(["prog", "show", "id", &prog_id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(!still_loaded, "program {prog_id} still loaded after exit");
    assert!(!pins.path.exists(), "pins left: {:?}", pins.entries());
}
