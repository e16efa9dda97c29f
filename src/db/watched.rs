//! A value made from a file an operator may renew while the server runs (the database's
//! authorities, its password): made at start, and made again by the next connection that finds
//! the file changed (its time of change, size or inode: a file renewed in place, or by a rename
//! as Kubernetes renews a mounted secret). A file that cannot be read, or makes no value, is
//! logged and the last good value kept: a renewal half done never takes a working node down.

use std::sync::Mutex;
use std::time::SystemTime;

/// What tells a file renewed: its time of change, size and inode.
type Stamp = (SystemTime, u64, u64);

fn stamp(path: &str) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// How a value is made from its file.
type Make<T> = Box<dyn Fn(&str) -> Result<T, String> + Send + Sync>;

/// A value made from the file at `path`, or made once where there is no file.
pub struct Watched<T> {
    path: Option<String>,
    what: &'static str,
    make: Make<T>,
    made: Mutex<(Option<Stamp>, T)>,
}

impl<T: Clone> Watched<T> {
    /// The value made now from `path` (`None`: made once, from nothing); an error if it can't
    /// be. `what` names it in the logs ("database authorities").
    pub fn new(
        path: Option<String>,
        what: &'static str,
        make: impl Fn(&str) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Watched<T>, String> {
        // The stamp before the read: a change while reading is seen by the next look.
        let stamp = path.as_deref().and_then(stamp);
        let value = make(path.as_deref().unwrap_or(""))?;
        Ok(Watched {
            path,
            what,
            make: Box::new(make),
            made: Mutex::new((stamp, value)),
        })
    }

    /// The value as the file is now: made again first if the file changed since it was last
    /// looked at (a stat each time; asked once per new connection).
    pub fn current(&self) -> T {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.path {
            let now = stamp(path);
            if now != made.0 {
                made.0 = now;
                match (self.make)(path) {
                    Ok(value) => {
                        made.1 = value;
                        tracing::info!(file = %path, "{} read again", self.what);
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "{} not read again; the last good ones are kept", self.what
                    ),
                }
            }
        }
        made.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewed_file_is_read_again_and_a_broken_one_keeps_the_last_good_value() {
        let dir = std::env::temp_dir().join(format!("triggers-watched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("value");
        let renew = |text: &str| {
            let next = dir.join("next");
            std::fs::write(&next, text).unwrap();
            std::fs::rename(&next, &path).unwrap();
        };
        let read = |path: &str| match std::fs::read_to_string(path) {
            Ok(text) if !text.is_empty() => Ok(text),
            Ok(_) => Err("empty".to_string()),
            Err(e) => Err(e.to_string()),
        };
        renew("one");
        let watched = Watched::new(Some(path.display().to_string()), "test value", read).unwrap();
        assert_eq!(watched.current(), "one");
        renew("two");
        assert_eq!(watched.current(), "two");
        // Broken, then gone: the last good value.
        renew("");
        assert_eq!(watched.current(), "two");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(watched.current(), "two");
        renew("three");
        assert_eq!(watched.current(), "three");
        // None at start is an error; no file at all is a value made once.
        assert!(Watched::new(Some(dir.join("none").display().to_string()), "x", read).is_err());
        let once = Watched::new(None, "x", |_| Ok(7)).unwrap();
        assert_eq!(once.current(), 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
