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
/// files by renaming, which a watch on the file itself would miss. Only events about the
/// watched files themselves, YAML files in a watched folder, or a ConfigMap mount's `..data`
/// swap count: the folder may hold other busy files (the agent's own log, say), and each
/// reload must not cause the next.
pub fn watch_paths(paths: &[PathBuf], tx: mpsc::Sender<()>) -> notify::Result<RecommendedWatcher> {
    let targets = Targets::new(paths);
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let filter = targets.clone();
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(e) if is_change(&e.kind) && e.paths.iter().any(|p| filter.concerns(p)) => {
                let _ = raw_tx.send(());
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "file watch error"),
        })?;
    for dir in targets.folders() {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
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

/// What a watch is about, as absolute paths (notify reports paths under the watched folder).
#[derive(Clone, Debug)]
struct Targets {
    files: BTreeSet<PathBuf>,
    folders: BTreeSet<PathBuf>,
}

impl Targets {
    fn new(paths: &[PathBuf]) -> Self {
        let mut files = BTreeSet::new();
        let mut folders = BTreeSet::new();
        for p in paths {
            let p = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            if p.is_dir() {
                folders.insert(p);
            } else {
                files.insert(p);
            }
        }
        Self { files, folders }
    }

    /// Folders to watch: the given ones and the parents of the given files.
    fn folders(&self) -> BTreeSet<PathBuf> {
        let parents = self
            .files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf));
        self.folders.iter().cloned().chain(parents).collect()
    }

    fn concerns(&self, path: &Path) -> bool {
        if self.files.contains(path) {
            return true;
        }
        let Some(parent) = path.parent() else {
            return false;
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Kubernetes swaps a ConfigMap or Secret mount by renaming `..data`.
        let mount_swap = name.starts_with("..");
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        let in_folder = self.folders.contains(parent);
        let beside_a_file = self.files.iter().any(|f| f.parent() == Some(parent));
        (mount_swap && (in_folder || beside_a_file)) || (yaml && in_folder)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_watched_files_and_yaml_in_watched_folders_count() {
        let dir = std::env::temp_dir().join(format!("cors-agent-watch-{}", std::process::id()));
        let sub = dir.join("routes");
        std::fs::create_dir_all(&sub).unwrap();
        let file = dir.join("a.yaml");
        let t = Targets::new(&[file.clone(), sub.clone()]);
        assert!(t.concerns(&file));
        assert!(!t.concerns(&dir.join("agent.log")), "a busy neighbour");
        assert!(
            !t.concerns(&dir.join("b.yaml")),
            "YAML beside a file is not watched"
        );
        assert!(
            t.concerns(&dir.join("..data")),
            "ConfigMap swap beside a file"
        );
        assert!(t.concerns(&sub.join("c.yml")));
        assert!(!t.concerns(&sub.join("c.yaml.swp")));
        assert_eq!(t.folders(), BTreeSet::from([dir.clone(), sub.clone()]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
