//! Client load generators, run as worker processes inside the client
//! namespace: this binary re-executed as `xtask bench --worker SPEC`.
//!
//! One process holds at most `ulimit -n` (20000) sockets, so the sessions
//! of a scenario are spread over several workers, and over many source
//! addresses (as bots come from many hosts). Each worker bounds its work
//! in count and time, prints JSON lines on stdout, and exits when its stdin
//! closes (the parent died or is done).
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use super::netns::{BenchNet, is_test_address};
use super::signal;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Mode {
    /// Connect and stay silent, until stdin closes.
    Hold,
    /// Connect, talk before the banner, read the verdict, repeat.
    Pregreet,
    /// Serve as an instant SMTP sink on `targets[0]` until killed (in the
    /// server namespace): greets at once, skips a PROXY v1 line, answers
    /// every command, takes DATA; what smtp-sink does, but without taking
    /// the PROXY line for a command (which would answer the client's EHLO
    /// with a 500).
    Sink,
    /// Connect, time the final greeting line against the configured delay,
    /// then go on as `after` says.
    Lateness {
        delay_ms: u64,
        #[serde(default)]
        after: AfterGreeting,
    },
}

/// What a lateness client does once greeted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AfterGreeting {
    /// QUIT at once.
    #[default]
    Quit,
    /// EHLO, then QUIT (a bot that gives up at EHLO).
    EhloQuit,
    /// EHLO, MAIL (its reply timed), RCPT, DATA, one message, QUIT.
    Transaction,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub mode: Mode,
    /// Server address per family (v4, v6): clients use their source's.
    pub targets: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    /// Sessions this worker makes in all.
    pub count: u32,
    /// Connects (or sessions, for Pregreet) in flight at once.
    pub concurrency: u32,
    /// Bound of the whole run (Hold: of the connect phase).
    pub time_limit_ms: u64,
    /// Hold: write an EHLO line right after connecting, as a pre-greet
    /// talker does (against the kernel hold its data stays unacknowledged
    /// and its stack probes the zero window).
    #[serde(default)]
    pub talk: bool,
    /// Hold and Lateness: new connects per second at most (0: as fast as
    /// the concurrency allows). Bots that connect in one burst probe in
    /// bursts ever after, which no real botnet does.
    #[serde(default)]
    pub connect_rate: u32,
}

/// What a talking held bot writes.
const TALK: &[u8] = b"EHLO bot.bench.test\r\n";

/// Everything a worker reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub event: String,
    pub connected: u64,
    pub failed: u64,
    /// Hold: sessions the server closed while they were held.
    pub closed_early: u64,
    /// Pregreet: sessions that got a 5xx verdict.
    pub judged: u64,
    /// Pregreet: sessions that ended some other way.
    pub not_judged: u64,
    pub elapsed_ms: f64,
    /// Lateness: observed minus configured delay, per session, in ms.
    pub lateness_ms: Vec<f64>,
    /// Lateness: greetings that came before the delay was over.
    pub early: u64,
    /// Lateness: how long each connect took, in ms.
    pub connect_ms: Vec<f64>,
    /// Lateness: counted from before connect() instead (includes the
    /// handshake and any SYN retry).
    pub lateness_from_syn_ms: Vec<f64>,
    /// Lateness with a transaction: how long the MAIL reply took, in ms.
    #[serde(default)]
    pub mail_ms: Vec<f64>,
    pub first_error: Option<String>,
}

// ---------------------------------------------------------------- child side

pub fn main(spec: &str) -> Result<()> {
    let spec: Spec = serde_json::from_str(spec).context("bad worker spec")?;
    for a in spec
        .targets
        .iter()
        .map(|t| t.ip())
        .chain(spec.sources.iter().copied())
    {
        if !is_test_address(a) && !a.is_loopback() {
            bail!("{a} is outside the test networks");
        }
    }
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async move {
        match spec.mode {
            Mode::Hold => hold(&spec).await,
            Mode::Pregreet => pregreet(&spec).await,
            Mode::Lateness { delay_ms, after } => lateness(&spec, delay_ms, after).await,
            Mode::Sink => sink(&spec).await,
        }
    });
    emit(&report);
    Ok(())
}

fn emit(r: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
    let _ = out.flush();
}

/// Raises this process's descriptor limit to its hard limit (children
/// inherit it).
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn target_for(spec: &Spec, src: IpAddr) -> Option<SocketAddr> {
    spec.targets
        .iter()
        .copied()
        .find(|t| t.is_ipv4() == src.is_ipv4())
}

async fn connect(spec: &Spec, i: u32) -> std::io::Result<TcpStream> {
    let src = spec.sources[i as usize % spec.sources.len()];
    let dst = target_for(spec, src)
        .ok_or_else(|| std::io::Error::other(format!("no target for the family of {src}")))?;
    let sock = if src.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(src, 0))?;
    tokio::time::timeout(Duration::from_secs(10), sock.connect(dst))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Stdin closing (or the parent's death) ends a hold.
async fn stdin_closed() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut buf = String::new();
        while std::io::stdin()
            .read_line(&mut buf)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            buf.clear();
        }
    })
    .await;
}

async fn hold(spec: &Spec) -> Report {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(spec.time_limit_ms);
    let sem = std::sync::Arc::new(Semaphore::new(spec.concurrency.max(1) as usize));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<TcpStream, String>>();
    for i in 0..spec.count {
        if spec.connect_rate > 0 {
            let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(spec.connect_rate));
            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        }
        let permit = sem.clone().acquire_owned().await;
        if Instant::now() >= deadline {
            break;
        }
        let tx = tx.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            let r = match connect(&spec, i).await {
                Ok(mut s) if spec.talk => s.write_all(TALK).await.map(|()| s),
                r => r,
            }
            .map_err(|e| e.to_string());
            drop(permit);
            let _ = tx.send(r);
        });
    }
    drop(tx);
    let mut report = Report {
        event: "ready".into(),
        ..Report::default()
    };
    let mut streams = Vec::new();
    while let Some(r) = rx.recv().await {
        match r {
            Ok(s) => {
                report.connected += 1;
                streams.push(s);
            }
            Err(e) => {
                report.failed += 1;
                report.first_error.get_or_insert(e);
            }
        }
    }
    report.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    emit(&report);
    // Held: read (and discard) whatever comes; EOF means closed early.
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in streams {
        let closed = closed.clone();
        tasks.spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                    Ok(_) => {}
                }
            }
        });
    }
    stdin_closed().await;
    tasks.abort_all();
    report.event = "done".into();
    report.closed_early = closed.load(std::sync::atomic::Ordering::Relaxed);
    report
}

async fn pregreet(spec: &Spec) -> Report {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(spec.time_limit_ms);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..spec.concurrency.max(1) {
        let spec = spec.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut r = Report::default();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= spec.count || Instant::now() >= deadline {
                    return r;
                }
                match pregreet_session(&spec, i, deadline).await {
                    Ok(true) => r.judged += 1,
                    Ok(false) => r.not_judged += 1,
                    Err(e) => {
                        r.failed += 1;
                        r.first_error.get_or_insert(e.to_string());
                    }
                }
            }
        });
    }
    let mut total = Report {
        event: "done".into(),
        ..Report::default()
    };
    while let Some(Ok(r)) = tasks.join_next().await {
        total.judged += r.judged;
        total.not_judged += r.not_judged;
        total.failed += r.failed;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total.connected = total.judged + total.not_judged;
    total.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    total
}

/// One bot: EHLO before the banner, then read until the server closes.
/// True when a 5xx verdict came back.
async fn pregreet_session(spec: &Spec, i: u32, deadline: Instant) -> std::io::Result<bool> {
    let mut s = connect(spec, i).await?;
    s.write_all(b"EHLO bot.bench.test\r\n").await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let limit =
        tokio::time::Instant::from_std(deadline.max(Instant::now()) + Duration::from_secs(10));
    loop {
        match tokio::time::timeout_at(limit, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > 8192 {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&got);
    Ok(text.lines().any(|l| l.starts_with('5')))
}

async fn lateness(spec: &Spec, delay_ms: u64, after: AfterGreeting) -> Report {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(spec.time_limit_ms);
    let sem = std::sync::Arc::new(Semaphore::new(spec.concurrency.max(1) as usize));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..spec.count {
        if spec.connect_rate > 0 {
            // Arrivals spread at the given rate, as mail servers see them.
            let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(spec.connect_rate));
            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        }
        if Instant::now() >= deadline {
            break;
        }
        // The permit bounds connects in flight, not sessions waiting.
        let permit = sem.clone().acquire_owned().await;
        let spec = spec.clone();
        tasks.spawn(async move {
            // Three instants: c0 before connect() (wall clock, which the
            // server's accept cannot precede), t0 when connect() returned,
            // and the KERNEL's receive time of the final greeting line
            // (SO_TIMESTAMPNS), so that a client busy with thousands of
            // other sockets does not add its own lag to the reading.
            let c0 = SystemTime::now();
            let s = connect(&spec, i).await;
            drop(permit);
            let mut s = s.map_err(|e| e.to_string())?;
            let t0 = SystemTime::now();
            enable_rx_timestamps(&s).map_err(|e| format!("SO_TIMESTAMPNS: {e}"))?;
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            let limit = Duration::from_millis(delay_ms) + Duration::from_secs(30);
            let started = Instant::now();
            loop {
                let (n, stamp) = tokio::time::timeout(
                    limit.saturating_sub(started.elapsed()),
                    read_stamped(&s, &mut buf),
                )
                .await
                .map_err(|_| "no greeting within the delay + 30 s".to_string())?
                .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed before the greeting".to_string());
                }
                got.extend_from_slice(&buf[..n]);
                // The final greeting line: "220 " (after any "220-" lines).
                let text = String::from_utf8_lossy(&got);
                if text.split("\r\n").any(|l| l.len() >= 4 && &l[3..4] == " ") {
                    let t1 = stamp.unwrap_or_else(SystemTime::now);
                    let mail_ms = match after {
                        AfterGreeting::Quit => None,
                        AfterGreeting::EhloQuit => {
                            exchange(&mut s, b"EHLO bench.example\r\n", b"250").await?;
                            None
                        }
                        AfterGreeting::Transaction => Some(transaction(&mut s).await?),
                    };
                    let _ = s.write_all(b"QUIT\r\n").await;
                    let ms = |a: SystemTime, b: SystemTime| match b.duration_since(a) {
                        Ok(d) => d.as_secs_f64() * 1e3,
                        Err(e) => -e.duration().as_secs_f64() * 1e3,
                    };
                    let delay = delay_ms as f64;
                    let late = ms(t0, t1) - delay;
                    let late_from_syn = ms(c0, t1) - delay;
                    return Ok(Timed {
                        late,
                        late_from_syn,
                        connect_ms: ms(c0, t0),
                        early: late_from_syn < -1.0,
                        mail_ms,
                    });
                }
            }
        });
    }
    let mut r = Report {
        event: "done".into(),
        ..Report::default()
    };
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Ok(t)) => {
                r.connected += 1;
                if t.early {
                    r.early += 1;
                }
                r.lateness_ms.push(t.late);
                r.lateness_from_syn_ms.push(t.late_from_syn);
                r.connect_ms.push(t.connect_ms);
                r.mail_ms.extend(t.mail_ms);
            }
            Ok(Err(e)) => {
                r.failed += 1;
                r.first_error.get_or_insert(e);
            }
            Err(e) => {
                r.failed += 1;
                r.first_error.get_or_insert(e.to_string());
            }
        }
    }
    r.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    r
}

/// One timed greeting.
struct Timed {
    /// From connect() returning to the greeting, minus the delay.
    late: f64,
    /// From before connect() to the greeting, minus the delay.
    late_from_syn: f64,
    connect_ms: f64,
    /// The greeting came before the delay, even counted from before connect().
    early: bool,
    /// With a transaction: how long the MAIL reply took.
    mail_ms: Option<f64>,
}

/// [`Mode::Sink`]: serves until killed.
async fn sink(spec: &Spec) -> Report {
    let serve = async {
        let addr = *spec.targets.first().context("no sink address")?;
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        let l = sock.listen(4096)?;
        loop {
            let (s, _) = l.accept().await?;
            tokio::spawn(async move {
                let _ = sink_session(s).await;
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    let first_error = serve.await.err().map(|e| format!("{e:#}"));
    Report {
        event: "done".into(),
        first_error,
        ..Report::default()
    }
}

/// One sink session.
async fn sink_session(s: TcpStream) -> std::io::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::new(r);
    w.write_all(b"220 sink ESMTP\r\n").await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb: Vec<u8> = line
            .iter()
            .take_while(|b| b.is_ascii_alphabetic())
            .map(u8::to_ascii_uppercase)
            .collect();
        let reply: &[u8] = match verb.as_slice() {
            b"PROXY" => continue,
            b"EHLO" => b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            b"DATA" => {
                w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                b"250 2.0.0 Ok: queued\r\n"
            }
            b"QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            _ => b"250 2.0.0 Ok\r\n",
        };
        w.write_all(reply).await?;
    }
}

/// Sends `line` and reads one whole reply, which must start with `code`.
async fn exchange(s: &mut TcpStream, line: &[u8], code: &[u8]) -> Result<(), String> {
    s.write_all(line).await.map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf))
            .await
            .map_err(|_| "no reply within 60 s".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "closed after {}",
                String::from_utf8_lossy(line).trim_end()
            ));
        }
        got.extend_from_slice(&buf[..n]);
        // A whole reply: its last line has a space after the code.
        if got.ends_with(b"\r\n")
            && let Some(last) = got[..got.len() - 2].rsplit(|&b| b == b'\n').next()
            && last.get(3) == Some(&b' ')
        {
            if !got.starts_with(code) {
                return Err(format!(
                    "{} got {}",
                    String::from_utf8_lossy(line).trim_end(),
                    String::from_utf8_lossy(&got).trim_end()
                ));
            }
            return Ok(());
        }
    }
}

/// EHLO, MAIL (timed, in ms), RCPT, DATA, a short message.
async fn transaction(s: &mut TcpStream) -> Result<f64, String> {
    exchange(s, b"EHLO bench.example\r\n", b"250").await?;
    let t = Instant::now();
    exchange(s, b"MAIL FROM:<bench@client.example>\r\n", b"250").await?;
    let mail = t.elapsed().as_secs_f64() * 1e3;
    exchange(s, b"RCPT TO:<sink@tarpit.test>\r\n", b"250").await?;
    exchange(s, b"DATA\r\n", b"354").await?;
    exchange(s, b"Subject: lateness\r\n\r\nbench\r\n.\r\n", b"250").await?;
    Ok(mail)
}

fn enable_rx_timestamps(s: &TcpStream) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a valid int option.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads like `read`, also returning the kernel's receive time of the data.
async fn read_stamped(
    s: &TcpStream,
    buf: &mut [u8],
) -> std::io::Result<(usize, Option<SystemTime>)> {
    loop {
        s.readable().await?;
        match s.try_io(tokio::io::Interest::READABLE, || {
            recv_stamped(s.as_raw_fd(), buf)
        }) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

fn recv_stamped(fd: i32, buf: &mut [u8]) -> std::io::Result<(usize, Option<SystemTime>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: a zeroed msghdr is valid; we point it at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg with buffers that outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: walking the control messages the kernel just wrote.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(
                    SystemTime::UNIX_EPOCH
                        + Duration::new(
                            ts.tv_sec.max(0) as u64,
                            ts.tv_nsec.clamp(0, 999_999_999) as u32,
                        ),
                );
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

// --------------------------------------------------------------- parent side

/// Worker processes of one measurement; Drop kills what still runs.
pub struct Workers {
    children: Vec<(Child, Option<ChildStdin>)>,
    lines: mpsc::Receiver<(usize, String)>,
}

impl Workers {
    /// Starts `n` workers in the client namespace, splitting `count`
    /// sessions and the source addresses between them.
    pub fn start(
        self_exe: &std::path::Path,
        net: &BenchNet,
        n: u32,
        spec: &Spec,
    ) -> Result<Workers> {
        let n = n.clamp(1, spec.count.max(1));
        let (tx, rx) = mpsc::channel();
        let mut w = Workers {
            children: Vec::new(),
            lines: rx,
        };
        for k in 0..n {
            let mut s = spec.clone();
            s.count = spec.count / n + u32::from(k < spec.count % n);
            s.concurrency = (spec.concurrency / n).max(1);
            s.connect_rate = spec.connect_rate.div_ceil(n);
            // Rotate the address list so workers start on different sources.
            let shift = (k as usize * spec.sources.len() / n as usize) % spec.sources.len().max(1);
            s.sources.rotate_left(shift);
            let mut child = net
                .client_cmd(&self_exe.display().to_string())
                .args(["bench", "--worker", &serde_json::to_string(&s)?])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot start a bench worker")?;
            let stdout = child.stdout.take().context("no worker stdout")?;
            let stdin = child.stdin.take();
            let tx = tx.clone();
            let idx = w.children.len();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send((idx, line)).is_err() {
                        return;
                    }
                }
            });
            w.children.push((child, stdin));
        }
        Ok(w)
    }

    /// Waits for one report with `event` from every worker.
    pub fn collect(&mut self, event: &str, timeout: Duration) -> Result<Vec<Report>> {
        let end = Instant::now() + timeout;
        let mut got: Vec<Option<Report>> = vec![None; self.children.len()];
        while got.iter().any(Option::is_none) {
            signal::check()?;
            let now = Instant::now();
            if now >= end {
                bail!(
                    "{} of {} workers did not report {event:?} within {timeout:?}",
                    got.iter().filter(|g| g.is_none()).count(),
                    got.len()
                );
            }
            match self
                .lines
                .recv_timeout((end - now).min(Duration::from_millis(100)))
            {
                Ok((i, line)) => {
                    let r: Report = serde_json::from_str(&line)
                        .with_context(|| format!("bad worker line {line:?}"))?;
                    if r.event == event {
                        got[i] = Some(r);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("workers exited before reporting {event:?}")
                }
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Tells holding workers to let go (closes their stdin).
    pub fn release(&mut self) {
        for (_, stdin) in &mut self.children {
            stdin.take();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.release();
        for (c, _) in &mut self.children {
            let waited = (0..40).any(|_| {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
                false
            });
            if !waited {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Sums worker reports.
pub fn sum(reports: &[Report]) -> Report {
    let mut t = Report::default();
    for r in reports {
        t.connected += r.connected;
        t.failed += r.failed;
        t.closed_early += r.closed_early;
        t.judged += r.judged;
        t.not_judged += r.not_judged;
        t.early += r.early;
        t.elapsed_ms = t.elapsed_ms.max(r.elapsed_ms);
        t.lateness_ms.extend_from_slice(&r.lateness_ms);
        t.connect_ms.extend_from_slice(&r.connect_ms);
        t.lateness_from_syn_ms
            .extend_from_slice(&r.lateness_from_syn_ms);
        t.mail_ms.extend_from_slice(&r.mail_ms);
        if t.first_error.is_none() {
            t.first_error.clone_from(&r.first_error);
        }
    }
    t
}
