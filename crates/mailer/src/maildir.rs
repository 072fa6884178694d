//! A Maildir: one file per message, written so that readers never see a
//! partial one.
//!
//! A message is written to `tmp/`, flushed to disk, then renamed into
//! `new/`; the rename is atomic, so a file in `new/` is always whole. File
//! names are given by the caller, so delivering the same message twice
//! replaces one file instead of adding a second. Lines end in LF, as mail
//! readers expect of local Maildir files; CRLF is for the wire.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A Maildir directory with its `tmp`, `new` and `cur` subdirectories.
#[derive(Debug, Clone)]
pub struct Maildir {
    root: PathBuf,
}

impl Maildir {
    /// Opens the Maildir at `root`, creating it if needed.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        Ok(Maildir {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether a message named `name` was already delivered (new or read).
    pub fn contains(&self, name: &str) -> bool {
        self.root.join("new").join(name).exists()
            || self.root.join("cur").join(format!("{name}:2,")).exists()
    }

    /// Delivers `message` as `new/<name>`, durably. Blocking: call it from
    /// a blocking thread.
    pub fn deliver(&self, name: &str, message: &[u8]) -> std::io::Result<()> {
        let staged = self.root.join("tmp").join(name);
        let delivered = self.root.join("new").join(name);

        let mut file = std::fs::File::create(&staged)?;
        file.write_all(&crlf_to_lf(message))?;
        file.sync_all()?;
        drop(file);

        std::fs::rename(&staged, &delivered)?;
        std::fs::File::open(self.root.join("new"))?.sync_all()
    }
}

fn crlf_to_lf(message: &[u8]) -> Vec<u8> {
    let mut local = Vec::with_capacity(message.len());
    let mut bytes = message.iter().peekable();
    while let Some(&byte) = bytes.next() {
        if byte == b'\r' && bytes.peek() == Some(&&b'\n') {
            continue;
        }
        local.push(byte);
    }
    local
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivered_message_is_whole_in_new_and_gone_from_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let maildir = Maildir::open(&dir.path().join("mail")).unwrap();
        maildir
            .deliver("m1.herald", b"Subject: hi\r\n\r\nbody")
            .unwrap();

        let new = maildir.root().join("new/m1.herald");
        assert_eq!(std::fs::read(new).unwrap(), b"Subject: hi\n\nbody");
        assert_eq!(
            std::fs::read_dir(maildir.root().join("tmp"))
                .unwrap()
                .count(),
            0
        );
        assert!(maildir.contains("m1.herald"));
    }

    #[test]
    fn delivering_the_same_name_twice_leaves_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let maildir = Maildir::open(dir.path()).unwrap();
        maildir.deliver("m1.herald", b"one").unwrap();
        maildir.deliver("m1.herald", b"one").unwrap();
        assert_eq!(
            std::fs::read_dir(maildir.root().join("new"))
                .unwrap()
                .count(),
            1
        );
    }
}
