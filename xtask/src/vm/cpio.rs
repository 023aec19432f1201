//! A minimal writer for the "newc" cpio format, the one the kernel unpacks as an initramfs.
//!
//! Written here rather than driving cpio(1): the archive can then hold a `/dev/console` node
//! and root-owned files without a staging tree, `mknod` or root on the host, and the large test
//! binaries are streamed straight from cargo's target directory.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams entries into a newc archive. Parent directories are added on demand, because the
/// kernel's unpacker does not create missing parents.
pub struct Writer {
    out: BufWriter<File>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

/// One entry's header fields that vary.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    size: u64,
    rdev: (u32, u32),
}

impl Writer {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, file),
            next_ino: 1,
            dirs: BTreeSet::new(),
        })
    }

    /// Adds a directory (and its parents). `path` is absolute inside the archive.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<()> {
        let name = relative(path)?;
        if name.is_empty() || self.dirs.contains(name) {
            return Ok(());
        }
        self.parents(name)?;
        self.header(&Header {
            name,
            mode: S_IFDIR | perm,
            size: 0,
            rdev: (0, 0),
        })?;
        self.dirs.insert(name.to_owned());
        Ok(())
    }

    /// Adds a regular file with the given contents.
    pub fn bytes(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<()> {
        let name = relative(path)?;
        self.parents(name)?;
        self.header(&Header {
            name,
            mode: S_IFREG | perm,
            size: data.len() as u64,
            rdev: (0, 0),
        })?;
        self.out.write_all(data)?;
        self.pad(data.len() as u64)
    }

    /// Adds a regular file copied from `src` on the host (following symlinks).
    pub fn file(&mut self, path: &str, perm: u32, src: &Path) -> Result<()> {
        let name = relative(path)?;
        self.parents(name)?;
        let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
        let size = input
            .metadata()
            .with_context(|| format!("reading metadata of {}", src.display()))?
            .len();
        self.header(&Header {
            name,
            mode: S_IFREG | perm,
            size,
            rdev: (0, 0),
        })?;
        let copied = io::copy(&mut input, &mut self.out)
            .with_context(|| format!("copying {} into the initramfs", src.display()))?;
        if copied != size {
            bail!("{} changed size while being packed", src.display());
        }
        self.pad(size)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let name = relative(path)?;
        self.parents(name)?;
        self.header(&Header {
            name,
            mode: S_IFLNK | 0o777,
            size: target.len() as u64,
            rdev: (0, 0),
        })?;
        self.out.write_all(target.as_bytes())?;
        self.pad(target.len() as u64)
    }

    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        let name = relative(path)?;
        self.parents(name)?;
        self.header(&Header {
            name,
            mode: S_IFCHR | perm,
            size: 0,
            rdev: (major, minor),
        })
    }

    /// Writes the trailer and flushes.
    pub fn finish(mut self) -> Result<()> {
        self.header(&Header {
            name: "TRAILER!!!",
            mode: 0,
            size: 0,
            rdev: (0, 0),
        })?;
        self.out.flush().context("writing the initramfs")?;
        Ok(())
    }

    fn parents(&mut self, name: &str) -> Result<()> {
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(&format!("/{parent}"), 0o755)?;
        }
        Ok(())
    }

    fn header(&mut self, h: &Header) -> Result<()> {
        let size = u32::try_from(h.size).with_context(|| format!("{} is over 4 GiB", h.name))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if h.mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        // Fields: magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize (with the NUL), check.
        write!(
            self.out,
            "070701{ino:08x}{:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            h.mode,
            0,
            0,
            0,
            0,
            0,
            h.rdev.0,
            h.rdev.1,
            h.name.len() + 1,
            0
        )?;
        self.out.write_all(h.name.as_bytes())?;
        self.out.write_all(&[0])?;
        // The header is 110 bytes; header plus name is padded to a multiple of four.
        self.pad(110 + h.name.len() as u64 + 1)
    }

    fn pad(&mut self, len: u64) -> Result<()> {
        let rest = (4 - len % 4) % 4;
        self.out.write_all(&[0; 3][..rest as usize])?;
        Ok(())
    }
}

/// Archive names are relative ("bin/sh"); callers use absolute guest paths.
fn relative(path: &str) -> Result<&str> {
    match path.strip_prefix('/') {
        Some(rest) if !rest.ends_with('/') => Ok(rest),
        _ => bail!("initramfs paths must be absolute without a trailing slash: {path:?}"),
    }
}
