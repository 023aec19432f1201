//! Running code inside another network namespace.
//!
//! A thread's network namespace decides where the sockets it creates live.
//! Switching namespaces (`setns(CLONE_NEWNET)`) is per thread, so it is never
//! done on a Tokio worker: an `.await` could resume elsewhere and a worker
//! left in a pod's namespace would silently create sockets there. Instead
//! (ztunnel-style) a synchronous closure runs on a dedicated thread that
//! entered the namespace, and only its result comes back. The socket keeps
//! its namespace for life, so connecting, accepting and I/O can then happen
//! on any thread.
//!
//! `setns` comes from `rustix`: a maintained (Bytecode Alliance) crate with
//! an fd-safe API (`BorrowedFd`) that is already in our dependency tree;
//! `nix` would do as well but adds a second syscall-wrapper crate.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use tokio::sync::oneshot;

/// `f_type` of nsfs, the filesystem of `/proc/<pid>/ns/*` and their bind
/// mounts such as `/var/run/netns/NAME`.
const NSFS_MAGIC: u64 = 0x6e73_6673;

/// An open handle on a network namespace (keeps it alive while open).
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens a network namespace from a path such as `/var/run/netns/NAME`
    /// or `/proc/<pid>/ns/net`.
    ///
    /// Fails with `NotFound` if the path does not exist and `InvalidInput` if
    /// it is not a namespace file.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = File::open(path)?;
        let fs = rustix::fs::fstatfs(&file)?;
        // `f_type` is signed on some targets; the magic fits either way.
        #[allow(clippy::unnecessary_cast)]
        if fs.f_type as u64 != NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a namespace file", path.display()),
            ));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The path this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a short-lived thread inside this namespace and returns
    /// its result. Use for rare operations (setup); see [`NetnsWorker`] for
    /// the per-connection path.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        thread::scope(|s| {
            let handle = thread::Builder::new()
                .name("cors-netns".into())
                .spawn_scoped(s, || {
                    self.enter()?;
                    f()
                })?;
            handle
                .join()
                .map_err(|_| io::Error::other("closure panicked inside the network namespace"))?
        })
    }

    /// Moves the calling thread into this namespace. Only for threads that
    /// never return to a pool.
    fn enter(&self) -> io::Result<()> {
        move_into_link_name_space(self.file.as_fd(), Some(LinkNameSpaceType::Network))
            .map_err(io::Error::from)
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            path: self.path.clone(),
        })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Runs `f` inside `ns` on a short-lived thread; see [`NetNs::run`].
pub fn in_netns<T: Send>(ns: &NetNs, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    ns.run(f)
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread parked inside one network namespace that runs closures on
/// request. Saves a thread spawn and a `setns` per upstream connection.
///
/// Dropping the worker ends the thread (after the job in progress, if any).
#[derive(Debug)]
pub struct NetnsWorker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NetnsWorker {
    /// Starts a worker thread inside `ns`.
    pub fn spawn(ns: &NetNs, name: &str) -> io::Result<Self> {
        let ns = ns.try_clone()?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let thread = thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                let entered = ns.enter();
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                drop(ns);
                if ok {
                    // Ends when every sender is dropped.
                    for job in rx {
                        job();
                    }
                }
            })?;
        let entered = ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns worker thread exited during start-up"))?;
        if let Err(e) = entered {
            let _ = thread.join();
            return Err(e);
        }
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `f` on the worker thread (inside the namespace) and awaits the
    /// result. `f` must be quick and must not block on the network.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .as_ref()
            .ok_or_else(worker_gone)?
            .send(job)
            .map_err(|_| worker_gone())?;
        rx.await.map_err(|_| worker_gone())?
    }
}

fn worker_gone() -> io::Error {
    io::Error::other("netns worker thread is gone (closure panicked or worker shut down)")
}

impl Drop for NetnsWorker {
    fn drop(&mut self) {
        // Closing the channel ends the loop; join so no thread outlives us.
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
