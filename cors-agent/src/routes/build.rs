//! Validating and compiling resources into a [`RouteTable`]. Validation is the compile step:
//! every check that can fail names the resource and field path.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, LazyLock};

use http::{HeaderName, Method};
use regex::Regex;

use super::attach::{self, AttachedPolicy, Level, PolicySource};
use super::matching::{Entry, HostMatch, PathMatch, ValueMatch};
use super::{RouteInfo, RouteTable, RuleInfo};
use crate::config::spec::{
    AgentgatewayPolicySpec, CorsSpec, GATEWAY_GROUP, HttpBackendRef, HttpRouteFilter,
    HttpRouteMatch, HttpRouteSpec,
};
use crate::config::{Diagnostics, Loaded, Resources, Severity};
use crate::cors::CorsPolicy;

/// The CRD default for `maxAge` in an HTTPRoute CORS filter.
const ROUTE_DEFAULT_MAX_AGE: i64 = 5;
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
const MAX_HOSTNAMES: usize = 16;
const MAX_FILTERS: usize = 16;
const MAX_VALUE_MATCHES: usize = 16;
const FILTER_TYPES: [&str; 8] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "RequestRedirect",
    "URLRewrite",
    "ExtensionRef",
    "CORS",
    "ExternalAuth",
];

static HOSTNAME_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
        .expect("static regex")
});
static SECTION_NAME_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
        .expect("static regex")
});

/// In node mode a port can name the Service it stands for: only rules whose backendRefs name
/// that Service and port apply there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub name: String,
    pub port: u16,
}

#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    pub service: Option<ServiceRef>,
}

/// What a policy's targetRef points at.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Route { ns: String, name: String },
    Gateway { ns: String, name: String },
}

struct Targeted {
    target: Target,
    section: Option<String>,
    policy: Arc<AttachedPolicy>,
    /// Where to warn if the target does not exist.
    owner: usize,
    field: String,
}

pub(super) fn build(
    res: &Resources,
    options: &BuildOptions,
) -> Result<(RouteTable, Diagnostics), Diagnostics> {
    let mut d = Diagnostics::default();
    if res.routes.is_empty() {
        // Most often a truncated or emptied file mid-write: serving it would answer 404 to
        // everything.
        d.push(crate::config::Diagnostic {
            severity: Severity::Error,
            file: None,
            line: None,
            resource: None,
            field: None,
            reason: "no HTTPRoute in the given resources: every request would get a 404".into(),
        });
    }
    let gateways = gateway_listeners(res, &mut d);
    let targeted = policies(res, &mut d);
    let mut used = vec![false; targeted.len()];

    let mut order: Vec<usize> = (0..res.routes.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (&res.routes[a], &res.routes[b]);
        match (ra.created(), rb.created()) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
        .then_with(|| (&ra.id.namespace, &ra.id.name).cmp(&(&rb.id.namespace, &rb.id.name)))
    });

    let mut table = RouteTable::default();
    let mut seen = HashSet::new();
    for (age, &i) in order.iter().enumerate() {
        let r = &res.routes[i];
        if !seen.insert(r.id.clone()) {
            d.push(r.diagnostic(
                Severity::Error,
                "metadata.name",
                format!("{} is defined twice", r.id),
            ));
            continue;
        }
        compile_route(
            r, age, &gateways, &targeted, &mut used, options, &mut table, &mut d,
        );
    }
    table.entries.sort_by(|a, b| a.precedence_cmp(b));
    table.index_entries();

    // Gateway-level policies also cover answers for requests that match no route.
    for (t, used) in targeted.iter().zip(used.iter_mut()) {
        if let Target::Gateway { ns, name } = &t.target {
            let known = gateways.is_empty() || gateways.contains_key(&(ns.clone(), name.clone()));
            if known {
                table.fallback.push(t.policy.clone());
                *used = true;
            }
        }
    }
    attach::sort(&mut table.fallback);

    for (t, used) in targeted.iter().zip(&used) {
        if !used {
            let what = match &t.target {
                Target::Route { ns, name } => format!("HTTPRoute {ns}/{name}"),
                Target::Gateway { ns, name } => format!("Gateway {ns}/{name}"),
            };
            let section = t
                .section
                .as_ref()
                .map(|s| format!(" with a rule or listener named {s:?}"))
                .unwrap_or_default();
            d.push(res.policies[t.owner].diagnostic(
                Severity::Warning,
                &t.field,
                format!("targets {what}{section}, which is not among the loaded resources; the policy applies nowhere"),
            ));
        }
    }

    if d.has_errors() {
        return Err(d);
    }
    Ok((table, d))
}

/// `(namespace, name)` of each loaded Gateway to its listener names.
fn gateway_listeners(
    res: &Resources,
    d: &mut Diagnostics,
) -> BTreeMap<(String, String), Vec<String>> {
    let mut out = BTreeMap::new();
    for g in &res.gateways {
        let mut names: Vec<String> = Vec::new();
        for (i, l) in g.object.spec.listeners.iter().enumerate() {
            let field = format!("spec.listeners[{i}].name");
            if names.contains(&l.name) {
                d.push(g.diagnostic(
                    Severity::Error,
                    &field,
                    format!("listener name {:?} is used twice", l.name),
                ));
            } else if !SECTION_NAME_RE.is_match(&l.name) {
                d.push(g.diagnostic(
                    Severity::Error,
                    &field,
                    format!("{:?} is not a valid listener name", l.name),
                ));
            }
            names.push(l.name.clone());
        }
        if out
            .insert((g.id.namespace.clone(), g.id.name.clone()), names)
            .is_some()
        {
            d.push(g.diagnostic(
                Severity::Error,
                "metadata.name",
                format!("{} is defined twice", g.id),
            ));
        }
    }
    out
}

fn policies(res: &Resources, d: &mut Diagnostics) -> Vec<Targeted> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (owner, p) in res.policies.iter().enumerate() {
        if !seen.insert(p.id.clone()) {
            d.push(p.diagnostic(
                Severity::Error,
                "metadata.name",
                format!("{} is defined twice", p.id),
            ));
            continue;
        }
        let spec: &AgentgatewayPolicySpec = &p.object.spec;
        if let Some(traffic) = &spec.traffic {
            for f in traffic.ignored_fields() {
                d.push(p.diagnostic(
                    Severity::Warning,
                    &format!("spec.traffic.{f}"),
                    "not enforced by cors-agent, which applies spec.traffic.cors only",
                ));
            }
        }
        if spec.target_selectors.is_some() {
            d.push(p.diagnostic(
                Severity::Warning,
                "spec.targetSelectors",
                "not supported by cors-agent: name targets with spec.targetRefs",
            ));
        }
        let Some(cors) = spec.traffic.as_ref().and_then(|t| t.cors.as_ref()) else {
            d.push(p.diagnostic(
                Severity::Warning,
                "spec",
                "has no spec.traffic.cors; cors-agent has nothing to apply from it",
            ));
            continue;
        };
        let Some(policy) = compile_cors(p, "spec.traffic.cors", cors, None, d) else {
            continue;
        };
        let refs = spec.target_refs.as_deref().unwrap_or(&[]);
        if refs.is_empty() {
            d.push(p.diagnostic(
                Severity::Error,
                "spec.targetRefs",
                "required: the HTTPRoute or Gateway this policy applies to",
            ));
        }
        for (i, t) in refs.iter().enumerate() {
            let field = format!("spec.targetRefs[{i}]");
            if t.group != GATEWAY_GROUP {
                d.push(p.diagnostic(
                    Severity::Warning,
                    &format!("{field}.group"),
                    format!("{}/{} is not a target cors-agent applies policies to (HTTPRoute or Gateway in {GATEWAY_GROUP})", t.group, t.kind),
                ));
                continue;
            }
            let (ns, name) = (p.id.namespace.clone(), t.name.clone());
            let (target, level) = match (t.kind.as_str(), &t.section_name) {
                ("HTTPRoute", None) => (Target::Route { ns, name }, Level::PolicyOnRoute),
                ("HTTPRoute", Some(_)) => (Target::Route { ns, name }, Level::PolicyOnRule),
                ("Gateway", None) => (Target::Gateway { ns, name }, Level::PolicyOnGateway),
                ("Gateway", Some(_)) => (Target::Gateway { ns, name }, Level::PolicyOnListener),
                (kind, _) => {
                    d.push(p.diagnostic(
                        Severity::Warning,
                        &format!("{field}.kind"),
                        format!("{kind} is not a target cors-agent applies policies to (HTTPRoute or Gateway)"),
                    ));
                    continue;
                }
            };
            out.push(Targeted {
                target,
                section: t.section_name.clone(),
                policy: Arc::new(AttachedPolicy {
                    level,
                    source: source(p, "spec.traffic.cors"),
                    policy: policy.clone(),
                }),
                owner,
                field,
            });
        }
    }
    out
}

fn source<S>(r: &Loaded<S>, field: &str) -> PolicySource {
    PolicySource {
        resource: r.id.clone(),
        file: r.file.clone(),
        line: r.line_of(field),
        field: field.to_string(),
        created: r.created().map(str::to_string),
    }
}

fn compile_cors<S>(
    r: &Loaded<S>,
    field: &str,
    spec: &CorsSpec,
    default_max_age: Option<i64>,
    d: &mut Diagnostics,
) -> Option<CorsPolicy> {
    match CorsPolicy::compile(spec, default_max_age) {
        Ok((policy, lints)) => {
            for l in lints {
                d.push(r.diagnostic(Severity::Warning, &format!("{field}.{}", l.field), l.reason));
            }
            Some(policy)
        }
        Err(errors) => {
            for e in errors {
                d.push(r.diagnostic(Severity::Error, &format!("{field}.{}", e.field), e.reason));
            }
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn compile_route(
    r: &Loaded<HttpRouteSpec>,
    age: usize,
    gateways: &BTreeMap<(String, String), Vec<String>>,
    targeted: &[Targeted],
    used: &mut [bool],
    options: &BuildOptions,
    table: &mut RouteTable,
    d: &mut Diagnostics,
) {
    let spec = &r.object.spec;
    let errors_before = d.errors.len();

    let hosts = hostnames(r, d);
    let parents = parent_gateways(r, gateways, d);
    if !gateways.is_empty() && parents.is_empty() {
        d.push(r.diagnostic(
            Severity::Warning,
            "spec.parentRefs",
            "attached to none of the loaded Gateways; the route is not served",
        ));
        return;
    }

    let default_rules = [Default::default()];
    let rules = spec.rules.as_deref().unwrap_or(&default_rules);
    if rules.len() > MAX_RULES {
        d.push(r.diagnostic(
            Severity::Error,
            "spec.rules",
            format!("{} rules, at most {MAX_RULES} are allowed", rules.len()),
        ));
    }
    let mut rule_names = HashSet::new();
    let route_index = table.routes.len();
    let mut compiled_rules = Vec::new();
    let mut entries = Vec::new();
    for (ri, rule) in rules.iter().enumerate() {
        let field = format!("spec.rules[{ri}]");
        if let Some(name) = &rule.name {
            if !SECTION_NAME_RE.is_match(name) || name.len() > 253 {
                d.push(r.diagnostic(
                    Severity::Error,
                    &format!("{field}.name"),
                    format!(
                        "{name:?} is not a valid rule name: lower-case letters, digits, '-' and '.'"
                    ),
                ));
            } else if !rule_names.insert(name.clone()) {
                d.push(r.diagnostic(
                    Severity::Error,
                    &format!("{field}.name"),
                    format!("rule name {name:?} is used twice"),
                ));
            }
        }

        // The chosen backendRef: the node port's Service when one is named, else the first
        // with a non-zero weight.
        let backend = match &options.service {
            Some(svc) => rule
                .backend_refs
                .iter()
                .enumerate()
                .find(|(_, b)| b.name == svc.name && b.port == Some(i64::from(svc.port))),
            None => rule
                .backend_refs
                .iter()
                .enumerate()
                .find(|(_, b)| b.weight != Some(0)),
        };
        for (bi, b) in rule.backend_refs.iter().enumerate() {
            check_backend_ref(r, &format!("{field}.backendRefs[{bi}]"), b, d);
        }
        if options.service.is_some() && backend.is_none() {
            continue;
        }

        let mut candidates: Vec<Arc<AttachedPolicy>> = Vec::new();
        if let Some((bi, b)) = backend {
            let bfield = format!("{field}.backendRefs[{bi}]");
            if let Some(p) = filters(r, &bfield, &b.filters, Level::BackendRefFilter, d) {
                candidates.push(p);
            }
        }
        if let Some(p) = filters(r, &field, &rule.filters, Level::RuleFilter, d) {
            candidates.push(p);
        }
        for (t, used) in targeted.iter().zip(used.iter_mut()) {
            let applies = match &t.target {
                Target::Route { ns, name } => {
                    *ns == r.id.namespace
                        && *name == r.id.name
                        && t.section
                            .as_ref()
                            .is_none_or(|s| rule.name.as_ref() == Some(s))
                }
                Target::Gateway { ns, name } => {
                    if gateways.is_empty() {
                        true
                    } else {
                        parents.iter().any(|(pns, pname, psection)| {
                            pns == ns
                                && pname == name
                                && match (&t.section, psection) {
                                    (None, _) => true,
                                    (Some(s), Some(ps)) => s == ps,
                                    (Some(s), None) => gateways
                                        .get(&(ns.clone(), name.clone()))
                                        .is_some_and(|l| l.contains(s)),
                                }
                        })
                    }
                }
            };
            if applies {
                *used = true;
                candidates.push(t.policy.clone());
            }
        }
        attach::sort(&mut candidates);

        let rule_index = table.rules.len() + compiled_rules.len();
        let default_matches = [HttpRouteMatch::default()];
        let matches = rule.matches.as_deref().unwrap_or(&default_matches);
        let matches = if matches.is_empty() {
            &default_matches[..]
        } else {
            matches
        };
        if matches.len() > MAX_MATCHES {
            d.push(r.diagnostic(
                Severity::Error,
                &format!("{field}.matches"),
                format!(
                    "{} matches, at most {MAX_MATCHES} are allowed",
                    matches.len()
                ),
            ));
        }
        for (mi, m) in matches.iter().enumerate() {
            let mfield = format!("{field}.matches[{mi}]");
            let Some((path, method, headers, query)) = compile_match(r, &mfield, m, d) else {
                continue;
            };
            if !headers.is_empty() && !candidates.is_empty() {
                d.push(r.diagnostic(
                    Severity::Warning,
                    &format!("{mfield}.headers"),
                    "a preflight cannot carry the real request's headers, so its route is chosen as if these header matches held",
                ));
            }
            for host in &hosts {
                entries.push(Entry {
                    rule: rule_index,
                    match_index: mi,
                    host: match host {
                        None => HostMatch::Any,
                        Some(h) => match h.strip_prefix('*') {
                            Some(suffix) => HostMatch::Subdomains(suffix.to_string()),
                            None => HostMatch::Exact(h.clone()),
                        },
                    },
                    path: path.clone(),
                    method: method.clone(),
                    headers: headers
                        .iter()
                        .map(|(n, v)| (n.clone(), v.clone()))
                        .collect(),
                    query: query.iter().map(|(n, v)| (n.clone(), v.clone())).collect(),
                    order: (age, ri, mi),
                });
            }
        }
        compiled_rules.push(RuleInfo {
            route: route_index,
            index: ri,
            name: rule.name.clone(),
            policies: candidates,
            backend: backend.map(|(_, b)| match b.port {
                Some(p) => format!("{}:{p}", b.name),
                None => b.name.clone(),
            }),
        });
    }

    if d.errors.len() > errors_before {
        return;
    }
    table.routes.push(RouteInfo {
        id: r.id.clone(),
        file: r.file.clone(),
        line: r.line,
        hostnames: spec.hostnames.clone(),
    });
    table.rules.extend(compiled_rules);
    table.entries.extend(entries);
}

/// `[None]` when the route lists no hostnames (it matches every host).
fn hostnames(r: &Loaded<HttpRouteSpec>, d: &mut Diagnostics) -> Vec<Option<String>> {
    let list = &r.object.spec.hostnames;
    if list.len() > MAX_HOSTNAMES {
        d.push(r.diagnostic(
            Severity::Error,
            "spec.hostnames",
            format!(
                "{} hostnames, at most {MAX_HOSTNAMES} are allowed",
                list.len()
            ),
        ));
    }
    if list.is_empty() {
        return vec![None];
    }
    let mut out = Vec::new();
    for (i, h) in list.iter().enumerate() {
        if !HOSTNAME_RE.is_match(h) || h.len() > 253 {
            d.push(r.diagnostic(
                Severity::Error,
                &format!("spec.hostnames[{i}]"),
                format!("{h:?} is not a hostname: lower-case DNS name, optionally starting with \"*.\", no IP address or port"),
            ));
        } else {
            out.push(Some(h.clone()));
        }
    }
    out
}

/// The loaded Gateways this route attaches to: `(namespace, name, sectionName)`.
fn parent_gateways(
    r: &Loaded<HttpRouteSpec>,
    gateways: &BTreeMap<(String, String), Vec<String>>,
    d: &mut Diagnostics,
) -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    for (i, p) in r.object.spec.parent_refs.iter().enumerate() {
        let is_gateway = p.group.as_deref().is_none_or(|g| g == GATEWAY_GROUP)
            && p.kind.as_deref().is_none_or(|k| k == "Gateway");
        if !is_gateway {
            continue;
        }
        let ns = p
            .namespace
            .clone()
            .unwrap_or_else(|| r.id.namespace.clone());
        let Some(listeners) = gateways.get(&(ns.clone(), p.name.clone())) else {
            continue;
        };
        if let Some(s) = &p.section_name
            && !listeners.contains(s)
        {
            d.push(r.diagnostic(
                Severity::Warning,
                &format!("spec.parentRefs[{i}].sectionName"),
                format!("Gateway {ns}/{} has no listener named {s:?}", p.name),
            ));
            continue;
        }
        out.push((ns, p.name.clone(), p.section_name.clone()));
    }
    out
}

fn check_backend_ref(
    r: &Loaded<HttpRouteSpec>,
    field: &str,
    b: &HttpBackendRef,
    d: &mut Diagnostics,
) {
    let is_service = b.group.as_deref().is_none_or(str::is_empty)
        && b.kind.as_deref().is_none_or(|k| k == "Service");
    if is_service && b.port.is_none() {
        d.push(r.diagnostic(
            Severity::Error,
            &format!("{field}.port"),
            "required when referring to a Service",
        ));
    }
    if let Some(p) = b.port
        && !(1..=65535).contains(&p)
    {
        d.push(r.diagnostic(
            Severity::Error,
            &format!("{field}.port"),
            format!("{p} is not a port (1 to 65535)"),
        ));
    }
    if let Some(w) = b.weight
        && !(0..=1_000_000).contains(&w)
    {
        d.push(r.diagnostic(
            Severity::Error,
            &format!("{field}.weight"),
            format!("{w} is out of range (0 to 1000000)"),
        ));
    }
}

/// Checks a filter list and compiles its CORS filter, if it has one.
fn filters(
    r: &Loaded<HttpRouteSpec>,
    field: &str,
    filters: &[HttpRouteFilter],
    level: Level,
    d: &mut Diagnostics,
) -> Option<Arc<AttachedPolicy>> {
    if filters.len() > MAX_FILTERS {
        d.push(r.diagnostic(
            Severity::Error,
            &format!("{field}.filters"),
            format!(
                "{} filters, at most {MAX_FILTERS} are allowed",
                filters.len()
            ),
        ));
    }
    let mut found: Option<(usize, Arc<AttachedPolicy>)> = None;
    for (i, f) in filters.iter().enumerate() {
        let ffield = format!("{field}.filters[{i}]");
        if !FILTER_TYPES.contains(&f.kind.as_str()) {
            d.push(r.diagnostic(
                Severity::Error,
                &format!("{ffield}.type"),
                format!("{:?} is not one of {}", f.kind, FILTER_TYPES.join(", ")),
            ));
            continue;
        }
        if f.kind != "CORS" {
            if f.cors.is_some() {
                d.push(r.diagnostic(
                    Severity::Error,
                    &format!("{ffield}.cors"),
                    format!("must not be set on a filter of type {}", f.kind),
                ));
            } else {
                d.push(r.diagnostic(
                    Severity::Warning,
                    &format!("{ffield}.type"),
                    format!(
                        "{} filters are not applied by cors-agent, which enforces CORS only",
                        f.kind
                    ),
                ));
            }
            continue;
        }
        let Some(cors) = &f.cors else {
            d.push(r.diagnostic(
                Severity::Error,
                &format!("{ffield}.cors"),
                "required when type is CORS",
            ));
            continue;
        };
        if let Some((first, _)) = &found {
            d.push(r.diagnostic(Severity::Error, &ffield, format!("a second CORS filter; only one is allowed (the first is {field}.filters[{first}])")));
            continue;
        }
        let cfield = format!("{ffield}.cors");
        if let Some(policy) = compile_cors(r, &cfield, cors, Some(ROUTE_DEFAULT_MAX_AGE), d) {
            found = Some((
                i,
                Arc::new(AttachedPolicy {
                    level,
                    source: source(r, &cfield),
                    policy,
                }),
            ));
        }
    }
    found.map(|(_, p)| p)
}

type CompiledMatch = (
    PathMatch,
    Option<Method>,
    Vec<(HeaderName, ValueMatch)>,
    Vec<(String, ValueMatch)>,
);

fn compile_match(
    r: &Loaded<HttpRouteSpec>,
    field: &str,
    m: &HttpRouteMatch,
    d: &mut Diagnostics,
) -> Option<CompiledMatch> {
    let errors_before = d.errors.len();
    let kind = m
        .path
        .as_ref()
        .and_then(|p| p.kind.as_deref())
        .unwrap_or("PathPrefix");
    let value = m
        .path
        .as_ref()
        .and_then(|p| p.value.as_deref())
        .unwrap_or("/");
    let pfield = format!("{field}.path.value");
    let path = match kind {
        "Exact" | "PathPrefix" => {
            if let Some(reason) = bad_path(value) {
                d.push(r.diagnostic(Severity::Error, &pfield, format!("{value:?} {reason}")));
            }
            if kind == "Exact" {
                PathMatch::Exact(value.to_string())
            } else {
                PathMatch::Prefix(value.trim_end_matches('/').to_string())
            }
        }
        "RegularExpression" => match anchored(value) {
            Ok(re) => PathMatch::Regex(re),
            Err(e) => {
                d.push(r.diagnostic(
                    Severity::Error,
                    &pfield,
                    format!("not a valid regular expression: {e}"),
                ));
                PathMatch::Exact(String::new())
            }
        },
        other => {
            d.push(r.diagnostic(
                Severity::Error,
                &format!("{field}.path.type"),
                format!("{other:?} is not one of Exact, PathPrefix, RegularExpression"),
            ));
            PathMatch::Exact(String::new())
        }
    };

    let method = m.method.as_deref().and_then(|s| {
        const METHODS: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        if METHODS.contains(&s) {
            Method::from_bytes(s.as_bytes()).ok()
        } else {
            d.push(r.diagnostic(
                Severity::Error,
                &format!("{field}.method"),
                format!("{s:?} is not one of {}", METHODS.join(" ")),
            ));
            None
        }
    });

    let headers = value_matches(r, &format!("{field}.headers"), &m.headers, d, |name| {
        HeaderName::from_bytes(name.as_bytes()).ok()
    });
    let query = value_matches(
        r,
        &format!("{field}.queryParams"),
        &m.query_params,
        d,
        |name| (!name.is_empty()).then(|| name.to_string()),
    );

    (d.errors.len() == errors_before).then_some((path, method, headers, query))
}

fn value_matches<N: PartialEq>(
    r: &Loaded<HttpRouteSpec>,
    field: &str,
    list: &[crate::config::spec::HttpHeaderMatch],
    d: &mut Diagnostics,
    name: impl Fn(&str) -> Option<N>,
) -> Vec<(N, ValueMatch)> {
    if list.len() > MAX_VALUE_MATCHES {
        d.push(r.diagnostic(
            Severity::Error,
            field,
            format!(
                "{} entries, at most {MAX_VALUE_MATCHES} are allowed",
                list.len()
            ),
        ));
    }
    let mut out: Vec<(N, ValueMatch)> = Vec::new();
    for (i, h) in list.iter().enumerate() {
        let ifield = format!("{field}[{i}]");
        let Some(n) = name(&h.name) else {
            d.push(r.diagnostic(
                Severity::Error,
                &format!("{ifield}.name"),
                format!("{:?} is not a valid name", h.name),
            ));
            continue;
        };
        if out.iter().any(|(m, _)| *m == n) {
            d.push(r.diagnostic(
                Severity::Error,
                &format!("{ifield}.name"),
                format!("{:?} is matched twice", h.name),
            ));
            continue;
        }
        let v = match h.kind.as_deref().unwrap_or("Exact") {
            "Exact" => ValueMatch::Exact(h.value.clone()),
            "RegularExpression" => match anchored(&h.value) {
                Ok(re) => ValueMatch::Regex(re),
                Err(e) => {
                    d.push(r.diagnostic(
                        Severity::Error,
                        &format!("{ifield}.value"),
                        format!("not a valid regular expression: {e}"),
                    ));
                    continue;
                }
            },
            other => {
                d.push(r.diagnostic(
                    Severity::Error,
                    &format!("{ifield}.type"),
                    format!("{other:?} is not one of Exact, RegularExpression"),
                ));
                continue;
            }
        };
        out.push((n, v));
    }
    out
}

/// Gateway API regular expressions match the whole value.
/// Gateway API regular expressions match the whole value. The pattern is checked on its own
/// first, so `a)|(b` cannot break out of the anchoring group and errors quote the user's text.
fn anchored(pattern: &str) -> Result<Regex, String> {
    let build = |p: &str| {
        regex::RegexBuilder::new(p)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| one_line(&e.to_string()))
    };
    build(pattern)?;
    build(&format!("^(?:{pattern})$"))
}

/// regex's syntax errors draw a caret under the pattern over several lines; a diagnostic is
/// one line.
fn one_line(message: &str) -> String {
    let reason = message
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.chars().all(|c| c == '^' || c == '~' || c == ' '))
        .unwrap_or(message);
    reason.trim_start_matches("error: ").to_string()
}

/// The CRD's rules for `Exact` and `PathPrefix` values.
fn bad_path(p: &str) -> Option<&'static str> {
    if !p.starts_with('/') {
        return Some("must start with \"/\"");
    }
    if p.len() > 1024 {
        return Some("is longer than 1024 characters");
    }
    if p.contains("//")
        || p.contains("/./")
        || p.contains("/../")
        || p.ends_with("/..")
        || p.ends_with("/.")
    {
        return Some("must not contain \"//\", \"/./\" or \"/../\" or end in \"/.\" or \"/..\"");
    }
    if p.contains('#') || p.to_ascii_lowercase().contains("%2f") {
        return Some("must not contain \"#\" or an encoded \"/\" (%2F)");
    }
    None
}
