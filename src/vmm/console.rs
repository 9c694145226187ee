//! The serial console log's size cap. The VMM appends to the file through
//! an `O_APPEND` descriptor it holds itself, so the daemon rotates by copy
//! and truncate: the VMM's next write lands at the new end, nothing is
//! reopened, and a daemon restart changes nothing.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;

/// Console logs are kept under this size (plus one rotated copy).
pub const MAX_CONSOLE_BYTES: u64 = 4 * 1024 * 1024;

/// When `path` is larger than `max`, copies it to `<path>.1` (replacing
/// the previous copy) and empties it. Answers whether it rotated.
pub fn rotate_if_larger(path: &Path, max: u64) -> io::Result<bool> {
    let len = match fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    fs::copy(path, &rotated)?;
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_large_log_is_copied_aside_and_emptied_and_appends_continue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open");
        writer.write_all(&[b'a'; 100]).expect("write");
        assert!(!rotate_if_larger(&path, 100).expect("rotate"));
        writer.write_all(b"b").expect("write");
        assert!(rotate_if_larger(&path, 100).expect("rotate"));
        assert_eq!(
            fs::metadata(dir.path().join("console.log.1"))
                .expect("copy")
                .len(),
            101
        );
        writer.write_all(b"after").expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"after");
    }
}
