//! The node's pods and their configuration: attaching at start, applying a reloaded
//! configuration (pods added, changed, removed), shutting down, and what the admin endpoint
//! shows.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde_json::{Value, json};
use tracing::{error, info, warn};

use crate::admin::{self, AdminView};
use crate::config::Diagnostics;
use crate::proxy::Metrics;
use crate::steer::FailMode;

use super::config::{self, NodeConfig};
use super::pods::{Pod, PodError, PodStatus, Settings};
use super::routes::RouteSet;

/// Every enrolled pod and the configuration they run with. Owned by one task: reloads are
/// applied one at a time.
pub struct Node {
    config: NodeConfig,
    routes: RouteSet,
    /// 1 at start, +1 per applied reload; every port serves this generation.
    generation: u64,
    pods: BTreeMap<String, Pod>,
    /// Pods of the configuration that could not be attached or updated, and why. Attaching
    /// is tried again on the next reload.
    errors: BTreeMap<String, String>,
    settings: Settings,
    admin: Arc<NodeAdmin>,
}

impl Node {
    /// Attaches every pod of `config`. Any failure stops the start: the pods attached so far
    /// are dropped again.
    pub async fn start(
        config: NodeConfig,
        routes: RouteSet,
        settings: Settings,
        admin: Arc<NodeAdmin>,
    ) -> Result<Self, PodError> {
        let mut pods = BTreeMap::new();
        for pod_config in &config.pods {
            let pod = Pod::attach(pod_config, &routes, &settings).await?;
            info!(pod = %pod_config.name, ports = ?ports_of(&pod), "pod attached");
            pods.insert(pod_config.name.clone(), pod);
        }
        let node = Self {
            config,
            routes,
            generation: 1,
            pods,
            errors: BTreeMap::new(),
            settings,
            admin,
        };
        node.publish();
        Ok(node)
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Reads the file and the resources again and applies them; an invalid configuration is
    /// refused whole, and the last good one stays.
    pub async fn reload(&mut self) {
        let path = self.config.path.clone();
        let generation = self.generation + 1;
        let loaded = tokio::task::spawn_blocking(move || {
            let config = config::load(&path)?;
            let (routes, warnings) = RouteSet::load(&config, generation)?;
            Ok::<_, Diagnostics>((config, routes, warnings))
        })
        .await;
        match loaded {
            Ok(Ok((config, routes, warnings))) => {
                for w in &warnings.warnings {
                    warn!("{w}");
                }
                self.apply(config, routes, generation).await;
                self.settings.metrics.config_reloaded(true, generation);
                self.admin.set_reload_error(None);
                info!(
                    generation,
                    pods = self.pods.len(),
                    failed = self.errors.len(),
                    "node configuration applied"
                );
            }
            Ok(Err(diags)) => {
                self.settings.metrics.config_reloaded(false, generation);
                let message = diags.to_string();
                error!(
                    "configuration reload refused ({} error(s)); still serving generation {}:\n{}",
                    diags.errors.len(),
                    self.generation,
                    message.trim_end()
                );
                self.admin.set_reload_error(Some(message));
            }
            Err(e) => error!(error = %e, "configuration reload task failed"),
        }
    }

    async fn apply(&mut self, config: NodeConfig, routes: RouteSet, generation: u64) {
        let drain = self.settings.limits.drain_timeout;
        let steering_changed =
            config.fail_mode != self.config.fail_mode || config.pin_dir != self.config.pin_dir;
        self.settings.steer.fail_mode = config.fail_mode;
        self.settings.steer.pin_root = config.pin_dir.clone();

        // Pods that are gone, or whose namespace is not the one they were attached to (a
        // re-created pod at the same path), or whose fail mode changed: detached first.
        let wanted: BTreeMap<&str, _> = config.pods.iter().map(|p| (p.name.as_str(), p)).collect();
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(name, pod)| {
                steering_changed
                    || !wanted
                        .get(name.as_str())
                        .is_some_and(|c| c.same_attachment(pod.config()))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            let Some(pod) = self.pods.remove(&name) else {
                continue;
            };
            pod.stop(drain);
            match pod.detach() {
                Ok(()) => info!(pod = %name, "pod detached"),
                Err(e) => error!(pod = %name, error = %e, "detaching the pod"),
            }
        }

        self.errors.clear();
        for pod_config in &config.pods {
            let name = pod_config.name.clone();
            let result = match self.pods.get_mut(&name) {
                Some(pod) => pod.update(pod_config, &routes, &self.settings),
                None => match Pod::attach(pod_config, &routes, &self.settings).await {
                    Ok(pod) => {
                        info!(pod = %name, ports = ?ports_of(&pod), "pod attached");
                        self.pods.insert(name.clone(), pod);
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = result {
                error!(pod = %name, error = %e, "pod not steered as configured; retried on the next reload");
                self.settings
                    .node_metrics
                    .attach_failed(&name.as_str().into());
                self.errors.insert(name, e.to_string());
            }
        }
        self.config = config;
        self.routes = routes;
        self.generation = generation;
        self.publish();
    }

    /// Re-reads every TLS port's certificates (SIGHUP).
    pub fn reload_certificates(&self) {
        for pod in self.pods.values() {
            pod.reload_certificates();
        }
    }

    /// Stops accepting on every pod, waits (at most `drain`) for connections in flight, then
    /// lets go of the programs: fail-open pods are detached, fail-closed pods stay pinned and
    /// keep refusing until an agent is back.
    pub async fn shutdown(self, drain: Duration) {
        for pod in self.pods.values() {
            pod.stop(drain);
        }
        let all = async {
            for pod in self.pods.values() {
                pod.drained().await;
            }
        };
        if tokio::time::timeout(drain, all).await.is_err() {
            warn!("drain timeout reached; exiting with requests still in flight");
        } else {
            info!("drained");
        }
        for (name, pod) in self.pods {
            match pod.fail_mode() {
                FailMode::Open => {
                    info!(pod = %name, "detaching (fail open: traffic now reaches the app directly)")
                }
                FailMode::Closed => {
                    info!(pod = %name, "leaving the program pinned (fail closed: steered ports refuse connections until an agent is back)")
                }
            }
            drop(pod);
        }
    }

    /// Renders what `/config_dump` shows and hands it to the admin view.
    fn publish(&self) {
        let mut pods: Vec<PodStatus> = self.pods.values().map(Pod::status).collect();
        for (name, error) in &self.errors {
            match pods.iter_mut().find(|p| &p.name == name) {
                Some(p) => p.error = Some(error.clone()),
                None => {
                    if let Some(c) = self.config.pods.iter().find(|c| &c.name == name) {
                        pods.push(PodStatus::failed(c, self.config.fail_mode, error.clone()));
                    }
                }
            }
        }
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        self.settings.node_metrics.pods_attached(self.pods.len());

        let tables: serde_json::Map<String, Value> = self
            .routes
            .all()
            .into_iter()
            .map(|(service, snapshot)| {
                let dump = admin::config_dump(snapshot, None);
                let key = service.map_or_else(|| "*".to_string(), ToString::to_string);
                // A service's table keeps every route, with only the rules sending traffic to
                // the service; routes left without rules are noise here.
                let routes: Vec<&Value> = dump["routes"]
                    .as_array()
                    .map(|r| r.iter().filter(|r| r["rules"] != json!([])).collect())
                    .unwrap_or_default();
                let value = json!({
                    "routes": routes,
                    "noRoutePolicy": dump["noRoutePolicy"],
                });
                (key, value)
            })
            .collect();
        let c = &self.config;
        let dump = json!({
            "mode": "node",
            "config": c.path.display().to_string(),
            "generation": self.generation,
            "loadedAt": std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "files": c.resources.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "unmatchedPreflights": c.unmatched,
            "failMode": fail_mode_name(c.fail_mode),
            "pinDir": c.pin_dir.display().to_string(),
            "pods": pods.iter().map(pod_json).collect::<Vec<_>>(),
            "routeTables": tables,
        });
        self.admin.publish(dump);
    }
}

fn fail_mode_name(mode: FailMode) -> &'static str {
    match mode {
        FailMode::Open => "open",
        FailMode::Closed => "closed",
    }
}

fn ports_of(pod: &Pod) -> Vec<u16> {
    pod.config().ports.iter().map(|p| p.port).collect()
}

fn pod_json(p: &PodStatus) -> Value {
    let display = |p: &PathBuf| p.display().to_string();
    json!({
        "name": p.name,
        "netns": p.netns,
        "attached": p.attached,
        "failMode": fail_mode_name(p.fail_mode),
        "programId": p.program_id,
        "ipv6": p.ipv6,
        "error": p.error,
        "ports": p.ports.iter().map(|port| json!({
            "port": port.port,
            // The key into `routeTables`.
            "service": port.service.as_ref().map_or_else(|| "*".to_string(), ToString::to_string),
            "tls": port.tls.as_ref().map(|t| json!({"cert": display(&t.cert), "key": display(&t.key)})),
        })).collect::<Vec<_>>(),
    })
}

/// What the admin listener reads: the last published dump, the metrics, and whether the
/// agent is draining.
pub struct NodeAdmin {
    metrics: Arc<Metrics>,
    dump: ArcSwap<Value>,
    draining: AtomicBool,
    last_reload_error: Mutex<Option<String>>,
}

impl NodeAdmin {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            dump: ArcSwap::from_pointee(Value::Null),
            draining: AtomicBool::new(false),
            last_reload_error: Mutex::new(None),
        }
    }

    fn publish(&self, dump: Value) {
        self.dump.store(Arc::new(dump));
    }

    fn set_reload_error(&self, error: Option<String>) {
        if let Ok(mut slot) = self.last_reload_error.lock() {
            *slot = error;
        }
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

impl AdminView for NodeAdmin {
    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    fn dump(&self) -> Value {
        let mut dump = (**self.dump.load()).clone();
        let error = self.last_reload_error.lock().ok().and_then(|e| e.clone());
        if let Value::Object(map) = &mut dump {
            map.insert("lastReloadError".into(), json!(error));
        }
        dump
    }
}
