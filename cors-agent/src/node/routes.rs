//! The route tables of a node: one per distinct `service:` its ports name (and one for ports
//! without), all compiled from one read of the resources, so every port serves the same
//! generation.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{self, Diagnostics, Severity};
use crate::proxy::Snapshot;
use crate::routes::{BuildOptions, RouteTable};

use super::config::{NodeConfig, Service};

pub struct RouteSet {
    tables: HashMap<Option<Service>, Arc<Snapshot>>,
}

impl RouteSet {
    /// Loads the resources once and compiles a table for every service the config uses.
    /// Errors stop the load; warnings come back with the set.
    pub fn load(config: &NodeConfig, generation: u64) -> Result<(Self, Diagnostics), Diagnostics> {
        let (resources, mut diags) = config::load(&config.resources);
        if diags.has_errors() {
            return Err(diags);
        }
        // Validate every route as `validate` would, whatever services are enrolled: a service
        // filter skips other Services' rules, and their errors must not go unnoticed.
        let all = match RouteTable::build(&resources, &BuildOptions::default()) {
            Ok((table, more)) => {
                diags.warnings.extend(more.warnings);
                table
            }
            Err(more) => {
                diags.errors.extend(more.errors);
                diags.warnings.extend(more.warnings);
                return Err(diags);
            }
        };
        let snapshot = |table| {
            Arc::new(Snapshot::new(
                table,
                config.unmatched,
                generation,
                config.resources.clone(),
            ))
        };
        let mut tables = HashMap::new();
        tables.insert(None, snapshot(all));
        for service in config.services().into_iter().flatten() {
            let options = BuildOptions {
                service: Some(service.to_ref()),
            };
            // Same resources, already validated: only the (duplicate) warnings are dropped.
            let table = match RouteTable::build(&resources, &options) {
                Ok((table, _)) => table,
                Err(more) => {
                    diags.errors.extend(more.errors);
                    return Err(diags);
                }
            };
            tables.insert(Some(service), snapshot(table));
        }

        let set = Self { tables };
        for port in config.pods.iter().flat_map(|p| &p.ports) {
            if let Some(service) = &port.service
                && set
                    .get(Some(service))
                    .is_some_and(|s| s.table.rules().is_empty())
            {
                diags.push(port.at.diagnostic(
                    Severity::Warning,
                    format!(
                        "no HTTPRoute rule has a backendRef to {service}; every request on port \
                         {} gets a 404 from the agent",
                        port.port
                    ),
                ));
            }
        }
        Ok((set, diags))
    }

    /// The table for ports naming `service` (`None`: every route).
    pub fn get(&self, service: Option<&Service>) -> Option<Arc<Snapshot>> {
        self.tables.get(&service.cloned()).cloned()
    }

    /// Every table, the one for all routes first, then by service.
    pub fn all(&self) -> Vec<(Option<&Service>, &Arc<Snapshot>)> {
        let mut all: Vec<_> = self.tables.iter().map(|(s, t)| (s.as_ref(), t)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}
