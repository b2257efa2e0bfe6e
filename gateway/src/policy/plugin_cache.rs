//! The compiled-plugin cache's trust checks.
//!
//! A cached artifact is native machine code: wasmtime maps it executable without checking what
//! is inside (`Component::deserialize` is `unsafe` for that reason). Whoever can write a file
//! the gateway deserialises runs code in the gateway, outside the sandbox. So the cache is used
//! only where nobody but the gateway's own user can write:
//!
//! - the directory is owned by the effective user and is not writable by group or others
//!   (created with mode 0700 when missing); otherwise it is not used at all, a warning names it
//!   and its mode, and plugins are compiled in memory;
//! - there is no fallback to the system's temporary directory;
//! - each cache file is opened without following symbolic links and checked on the open
//!   descriptor (a regular file, owned by the effective user, not group/other writable)
//!   before a byte of it is used, so it cannot be swapped between check and use;
//! - new files are created exclusively (`O_EXCL`) with mode 0600 under a random name and
//!   renamed into place, so a reader never sees half a file and nothing pre-planted is
//!   written through.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a cache directory or file is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    #[error("{path} is owned by uid {owner}, not by the gateway's user (uid {euid})")]
    NotOwned {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("{path} has mode {mode:04o}: group or others can write to it")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is not a regular file (a symbolic link or something else)")]
    NotARegularFile { path: PathBuf },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
}

impl Untrusted {
    /// The permission bits this verdict is about, for the warning (`None` when not about
    /// them).
    pub fn mode(&self) -> Option<u32> {
        match self {
            Untrusted::Writable { mode, .. } => Some(*mode),
            _ => None,
        }
    }
}

/// The effective user id: files and directories the cache trusts must belong to it.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Group- or other-writable permission bits.
const WRITABLE_BY_OTHERS: u32 = 0o022;

fn check_owner_and_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), Untrusted> {
    let euid = euid();
    if meta.uid() != euid {
        return Err(Untrusted::NotOwned {
            path: path.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & WRITABLE_BY_OTHERS != 0 {
        return Err(Untrusted::Writable {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// `$XDG_CACHE_HOME/tollgate/compiled`, else `$HOME/.cache/tollgate/compiled`; `None` when
/// neither is set. Never the temporary directory: anyone may create the path there first.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("tollgate").join("compiled"))
}

/// Creates `dir` (and missing parents) with mode 0700 if it does not exist, then checks that
/// it is a directory owned by the effective user and not writable by group or others.
pub fn prepare_dir(dir: &Path) -> Result<(), Untrusted> {
    let io = |error| Untrusted::Io {
        path: dir.to_owned(),
        error,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    // Follows a symbolic link: what matters is who can write to the directory files land in.
    let meta = std::fs::metadata(dir).map_err(io)?;
    if !meta.is_dir() {
        return Err(Untrusted::NotADirectory {
            path: dir.to_owned(),
        });
    }
    check_owner_and_mode(dir, &meta)
}

/// Reads cache file `file` if it exists and may be trusted: opened without following a
/// symbolic link, then checked on the open descriptor (regular file, owned by the effective
/// user, not group/other writable), so the bytes returned are the ones checked. `Ok(None)`:
/// there is no such file.
pub fn read_trusted(file: &Path) -> Result<Option<Vec<u8>>, Untrusted> {
    let io = |error| Untrusted::Io {
        path: file.to_owned(),
        error,
    };
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(file)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // O_NOFOLLOW on a symbolic link.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Untrusted::NotARegularFile {
                path: file.to_owned(),
            })
        }
        Err(e) => return Err(io(e)),
    };
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(Untrusted::NotARegularFile {
            path: file.to_owned(),
        });
    }
    check_owner_and_mode(file, &meta)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    f.read_to_end(&mut bytes).map_err(io)?;
    Ok(Some(bytes))
}

/// Stores `bytes` as `dir/name`: written to a new file (`O_EXCL`, mode 0600) under a random
/// name, then renamed over `name`, so a concurrent reader sees the old file or the new one.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(
        "{name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    let stored = written.and_then(|()| std::fs::rename(&tmp, dir.join(name)));
    if stored.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!(
                "tollgate-unit-cache-{tag}-{}-{:x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let s = Scratch::new("dir");
        for (mode, ok) in [
            (0o700, true),
            (0o755, true),
            (0o750, true),
            (0o775, false),
            (0o777, false),
            (0o1777, false),
            (0o722, false),
        ] {
            chmod(&s.0, mode);
            let r = prepare_dir(&s.0);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert_eq!(e.mode(), Some(mode), "{e}");
                assert!(e.to_string().contains(&format!("{mode:04o}")), "{e}");
            }
        }
    }

    #[test]
    fn a_missing_directory_is_created_0700() {
        let s = Scratch::new("create");
        let dir = s.0.join("a").join("b");
        prepare_dir(&dir).unwrap();
        for d in [s.0.join("a"), dir] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }

    #[test]
    fn a_file_in_place_of_the_directory_is_refused() {
        let s = Scratch::new("notdir");
        let f = s.0.join("f");
        std::fs::write(&f, b"x").unwrap();
        assert!(prepare_dir(&f).is_err());
    }

    /// Only root can give a directory away; other users skip this case.
    #[test]
    fn a_directory_owned_by_another_user_is_refused() {
        if euid() != 0 {
            return;
        }
        let s = Scratch::new("owner");
        chmod(&s.0, 0o700);
        std::os::unix::fs::chown(&s.0, Some(4242), None).unwrap();
        match prepare_dir(&s.0) {
            Err(Untrusted::NotOwned { owner: 4242, .. }) => {}
            other => panic!("{other:?}"),
        }
        let f = s.0.join("x.cwasm");
        std::fs::write(&f, b"x").unwrap();
        std::os::unix::fs::chown(&f, Some(4242), None).unwrap();
        assert!(matches!(
            read_trusted(&f),
            Err(Untrusted::NotOwned { owner: 4242, .. })
        ));
    }

    #[test]
    fn cache_files_are_written_0600_and_read_only_when_trustworthy() {
        let s = Scratch::new("files");
        write(&s.0, "k.cwasm", b"artifact").unwrap();
        let f = s.0.join("k.cwasm");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_trusted(&f).unwrap().as_deref(), Some(&b"artifact"[..]));
        // Replacing an existing file works (rename over it), and no temporary is left.
        write(&s.0, "k.cwasm", b"newer").unwrap();
        assert_eq!(read_trusted(&f).unwrap().as_deref(), Some(&b"newer"[..]));
        assert_eq!(std::fs::read_dir(&s.0).unwrap().count(), 1);

        assert!(read_trusted(&s.0.join("absent.cwasm")).unwrap().is_none());

        chmod(&f, 0o666);
        assert!(matches!(
            read_trusted(&f),
            Err(Untrusted::Writable { mode: 0o666, .. })
        ));
        chmod(&f, 0o620);
        assert!(read_trusted(&f).is_err());
        chmod(&f, 0o644);
        assert!(read_trusted(&f).unwrap().is_some());

        let link = s.0.join("link.cwasm");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(matches!(
            read_trusted(&link),
            Err(Untrusted::NotARegularFile { .. })
        ));
        let sub = s.0.join("dir.cwasm");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            read_trusted(&sub),
            Err(Untrusted::NotARegularFile { .. })
        ));
    }
}
