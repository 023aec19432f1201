//! Node mode's own metrics, registered next to the proxy's so `/metrics` is one exposition.
//! The request metrics themselves come from the proxy, labelled with the pod.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabel {
    pod: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodPortLabels {
    pod: Arc<str>,
    port: u16,
}

/// Cheap to clone: every field shares its values.
#[derive(Clone, Debug, Default)]
pub struct NodeMetrics {
    pods: Gauge,
    attach_errors: Family<PodLabel, Counter>,
    steered: Family<PodPortLabels, Counter>,
}

impl NodeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "pods_attached",
            "Pods whose ports are steered to this agent now",
            m.pods.clone(),
        );
        registry.register(
            "pod_attach_errors",
            "Failed attempts to attach or update a pod's steering",
            m.attach_errors.clone(),
        );
        registry.register(
            "steered_connections",
            "Connections the steering program handed to the agent, by pod and port",
            m.steered.clone(),
        );
        m
    }

    pub fn pods_attached(&self, n: usize) {
        self.pods.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn attach_failed(&self, pod: &Arc<str>) {
        self.attach_errors
            .get_or_create(&PodLabel { pod: pod.clone() })
            .inc();
    }

    pub fn steered(&self, pod: &Arc<str>, port: u16) {
        self.steered
            .get_or_create(&PodPortLabels {
                pod: pod.clone(),
                port,
            })
            .inc();
    }
}
