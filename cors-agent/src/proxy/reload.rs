//! Reloading: load and validate again on SIGHUP or when a watched file changes, swap the new
//! snapshot in whole, and keep serving the last good one when the new one is invalid.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, MetadataKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::Diagnostics;
use crate::cors::UnmatchedPreflights;
use crate::engine::load_table;
use crate::routes::BuildOptions;

use super::{Shared, Snapshot};

/// Editors and `kubectl` write a file in several steps; wait this long after the last event.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub files: Vec<PathBuf>,
    pub unmatched: UnmatchedPreflights,
    pub options: BuildOptions,
}

impl ConfigSource {
    /// Loads and validates; errors and warnings come back as the engine reports them.
    pub fn load(&self, generation: u64) -> Result<(Snapshot, Diagnostics), Diagnostics> {
        let (table, diags) = load_table(&self.files, &self.options)?;
        let snapshot = Snapshot::new(table, self.unmatched, generation, self.files.clone());
        Ok((snapshot, diags))
    }
}

/// Reloads the configuration each time `triggers` fires, until every sender is gone.
pub async fn run(source: ConfigSource, shared: Arc<Shared>, mut triggers: mpsc::Receiver<()>) {
    while triggers.recv().await.is_some() {
        // Several triggers queued during one load need only one more load.
        while triggers.try_recv().is_ok() {}
        let generation = shared.snapshot().generation + 1;
        let src = source.clone();
        let loaded = tokio::task::spawn_blocking(move || src.load(generation)).await;
        match loaded {
            Ok(Ok((snapshot, diags))) => {
                for w in &diags.warnings {
                    warn!("{w}");
                }
                let rules = snapshot.table.rules().len();
                shared.install(snapshot);
                info!(generation, rules, "configuration reloaded");
            }
            Ok(Err(diags)) => {
                shared.metrics.config_reloaded(false, generation);
                let message = diags.to_string();
                error!(
                    "configuration reload refused ({} error(s)); still serving generation {}:\n{}",
                    diags.errors.len(),
                    generation - 1,
                    message.trim_end()
                );
                shared.set_reload_error(Some(message));
            }
            Err(e) => error!(error = %e, "configuration reload task failed"),
        }
    }
}

/// Watches `paths` (files or folders) and sends one `()` on `tx` per burst of changes.
///
/// Files are watched through their folder: editors and Kubernetes ConfigMap mounts replace
/// files by renaming, which a watch on the file itself would miss. Any change in a watched
/// folder triggers a reload; reloading an unchanged configuration is harmless.
pub fn watch_paths(paths: &[PathBuf], tx: mpsc::Sender<()>) -> notify::Result<RecommendedWatcher> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(e) if is_change(&e.kind) => {
                let _ = raw_tx.send(());
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "file watch error"),
        })?;
    let dirs: BTreeSet<PathBuf> = paths.iter().map(|p| folder_of(p)).collect();
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Quiet for DEBOUNCE since the last event: the writer is done.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await {}
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(watcher)
}

fn folder_of(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Our own reads open files too; only writes, creations, renames and removals count.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other | EventKind::Any => false,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
    }
}
