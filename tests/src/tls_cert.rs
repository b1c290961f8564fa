//! Throw-away TLS certificates for the tests (openssl, self-signed, one
//! day): the agent's own, or an MTA's.
use std::path::Path;
use std::process::Command;

/// A self-signed certificate and key for `cn`, written into `dir` as
/// `<cn>.pem` and `<cn>.key`; returns their paths.
pub fn make_cert(dir: &Path, cn: &str) -> (String, String) {
    std::fs::create_dir_all(dir).expect("certificate directory");
    let (cert, key) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .arg("-subj")
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert.display().to_string(), key.display().to_string())
}
