//! Running code inside another network namespace.
//!
//! A thread's network namespace decides where the sockets it creates live.
//! Switching namespaces (`setns(CLONE_NEWNET)`) is per thread, so it is never
//! done on a Tokio worker: an `.await` could resume elsewhere and a worker
//! left in a pod's namespace would silently create sockets there. Instead
//! (ztunnel-style) a synchronous closure runs on a dedicated thread that
//! entered the namespace (one thread for all namespaces, see [`NetnsWorker`]),
//! and only its result comes back. The socket keeps
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
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
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

/// A job for the namespace thread: enters `ns` (unless the thread is already there), then
/// calls `run` with the outcome of entering.
struct Job {
    ns: Arc<NetNs>,
    id: u64,
    run: Box<dyn FnOnce(io::Result<()>) + Send>,
}

/// Runs closures inside one network namespace, on request, on the process's one namespace
/// thread: a thread parked in the namespace (rather than a spawn per operation) that enters
/// the namespace of each job in turn. `setns` is cheap next to what follows it (a TCP
/// connect; upstream connections are pooled), and it is skipped when consecutive jobs are
/// for the same namespace.
///
/// One thread for the process rather than one per namespace: a thread per enrolled pod cost
/// its stack and its malloc state, ~9 KiB of resident memory per pod for a thread that is
/// idle nearly all the time (`cargo xtask bench`, 100 pods). Jobs are serialised, so they
/// must be quick (socket creation, never a blocking connect).
///
/// Cheap to keep: dropping the worker closes nothing but its handle on the namespace (jobs
/// already queued hold their own).
#[derive(Debug)]
pub struct NetnsWorker {
    ns: Arc<NetNs>,
    /// Tells namespaces apart on the thread (a pointer could be reused by a later one).
    id: u64,
}

impl NetnsWorker {
    /// A worker for `ns`; fails if the namespace cannot be entered (checked once, here).
    /// Blocks until the namespace thread has tried (microseconds unless it is busy).
    pub fn spawn(ns: &NetNs) -> io::Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let worker = Self {
            ns: Arc::new(ns.try_clone()?),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        };
        let (tx, rx) = mpsc::sync_channel(1);
        worker.submit(Box::new(move |entered| {
            let _ = tx.send(entered);
        }))?;
        rx.recv().map_err(|_| worker_gone())??;
        Ok(worker)
    }

    /// Runs `f` on the namespace thread (inside the namespace) and awaits the result. `f`
    /// must be quick and must not block on the network.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(Box::new(move |entered| {
            let _ = tx.send(entered.and_then(|()| f()));
        }))?;
        // A panic in `f` drops `tx` unanswered: an error here, and the thread goes on.
        rx.await.map_err(|_| worker_gone())?
    }

    fn submit(&self, run: Box<dyn FnOnce(io::Result<()>) + Send>) -> io::Result<()> {
        let job = Job {
            ns: self.ns.clone(),
            id: self.id,
            run,
        };
        namespace_thread()?.send(job).map_err(|_| worker_gone())
    }
}

/// The process's namespace thread, started on first use; it lives as long as the process.
fn namespace_thread() -> io::Result<&'static mpsc::Sender<Job>> {
    static THREAD: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    if let Some(jobs) = THREAD.get() {
        return Ok(jobs);
    }
    // Two first callers may race to start one; only the first stored is used, the other
    // thread ends at once (its channel's sender is dropped).
    let (jobs, rx) = mpsc::channel::<Job>();
    // Where the thread goes back to between jobs: the agent's own namespace.
    let home = NetNs::open("/proc/thread-self/ns/net")?;
    thread::Builder::new()
        .name("cors-netns-jobs".into())
        .spawn(move || namespace_loop(&rx, &home))?;
    Ok(THREAD.get_or_init(|| jobs))
}

fn namespace_loop(rx: &mpsc::Receiver<Job>, home: &NetNs) {
    // The namespace this thread is in, by worker id; `None` at home, and after a failed
    // `setns`.
    let mut inside = None;
    while let Ok(job) = rx.recv() {
        let mut next = Some(job);
        while let Some(job) = next.take() {
            let entered = if inside == Some(job.id) {
                Ok(())
            } else {
                inside = None;
                job.ns.enter().inspect(|()| inside = Some(job.id))
            };
            drop(job.ns);
            // A panicking closure must not take the thread (and every pod's connects) with it.
            let _ = panic::catch_unwind(AssertUnwindSafe(move || (job.run)(entered)));
            next = rx.try_recv().ok();
        }
        // A thread inside a namespace keeps it alive: never wait for work in a pod's, which
        // would then outlive its pod.
        if inside.take().is_some()
            && let Err(e) = home.enter()
        {
            tracing::warn!(error = %e, "cannot return the namespace thread to the agent's own network namespace");
        }
    }
}

fn worker_gone() -> io::Error {
    io::Error::other("netns worker thread is gone (closure panicked or worker shut down)")
}
