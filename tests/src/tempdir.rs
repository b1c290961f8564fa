//! A scratch directory of one test.
use std::path::PathBuf;

use crate::env::unique_id;

/// `<tmp>/tarpit-<tag>-<id>`, made at once and removed on drop (also when
/// the test fails).
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("tarpit-{tag}-{}", unique_id()));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
