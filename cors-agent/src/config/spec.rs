//! The resources as users write them (`*Spec`), shaped exactly like the YAML. Unknown fields
//! are an error, as the API server's strict decoding would make them; fields the CRDs define
//! that cors-agent does not act on are accepted as opaque values (and warned about where a
//! user could expect an effect).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub const AGENTGATEWAY_GROUP: &str = "agentgateway.dev";

/// The first look at a document: enough to know which type to read it as.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeMeta {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Object<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default)]
    pub status: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub creation_timestamp: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub generation: Option<i64>,
    pub generate_name: Option<String>,
    pub finalizers: Option<Vec<String>>,
    pub owner_references: Option<Vec<Value>>,
    pub managed_fields: Option<Vec<Value>>,
    pub deletion_timestamp: Option<String>,
    pub deletion_grace_period_seconds: Option<i64>,
}

// ---------------------------------------------------------------- HTTPRoute

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Omitted means one rule matching every path, as the CRD defaults it.
    pub rules: Option<Vec<HttpRouteRule>>,
    pub use_default_gateways: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentReference {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRule {
    pub name: Option<String>,
    /// Omitted means `[{path: {type: PathPrefix, value: /}}]`.
    pub matches: Option<Vec<HttpRouteMatch>>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    pub timeouts: Option<Value>,
    pub retry: Option<Value>,
    pub session_persistence: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<HttpHeaderMatch>,
    pub method: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpPathMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

/// Header and query-parameter matches share one shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHeaderMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    pub cors: Option<CorsSpec>,
    pub request_header_modifier: Option<Value>,
    pub response_header_modifier: Option<Value>,
    pub request_mirror: Option<Value>,
    pub request_redirect: Option<Value>,
    pub url_rewrite: Option<Value>,
    pub extension_ref: Option<Value>,
    pub external_auth: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpBackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
    pub weight: Option<i64>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

/// `HTTPCORSFilter`, and the same fields inlined in `AgentgatewayPolicy.spec.traffic.cors`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CorsSpec {
    pub allow_origins: Option<Vec<String>>,
    pub allow_methods: Option<Vec<String>>,
    pub allow_headers: Option<Vec<String>>,
    pub expose_headers: Option<Vec<String>>,
    pub allow_credentials: Option<bool>,
    pub max_age: Option<i64>,
}

// ---------------------------------------------------------------- Gateway

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    pub addresses: Option<Value>,
    pub infrastructure: Option<Value>,
    pub allowed_listeners: Option<Value>,
    pub backend_tls: Option<Value>,
    pub tls: Option<Value>,
    pub default_scope: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    pub hostname: Option<String>,
    pub port: i64,
    pub protocol: String,
    pub tls: Option<Value>,
    pub allowed_routes: Option<Value>,
}

// ---------------------------------------------------------------- AgentgatewayPolicy

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentgatewayPolicySpec {
    pub target_refs: Option<Vec<PolicyTargetRef>>,
    pub target_selectors: Option<Value>,
    pub frontend: Option<Value>,
    pub traffic: Option<TrafficSpec>,
    pub backend: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub section_name: Option<String>,
}

/// `spec.traffic`: cors-agent enforces `cors`; the other policies agentgateway defines here
/// are accepted so that the same file loads, and `validate` says they have no effect.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficSpec {
    pub cors: Option<CorsSpec>,
    pub phase: Option<Value>,
    pub transformation: Option<Value>,
    pub ext_proc: Option<Value>,
    pub ext_auth: Option<Value>,
    pub rate_limit: Option<Value>,
    pub csrf: Option<Value>,
    pub header_modifiers: Option<Value>,
    pub host_rewrite: Option<Value>,
    pub timeouts: Option<Value>,
    pub retry: Option<Value>,
    pub authorization: Option<Value>,
    pub jwt_authentication: Option<Value>,
    pub basic_authentication: Option<Value>,
    pub api_key_authentication: Option<Value>,
    pub direct_response: Option<Value>,
}

impl TrafficSpec {
    /// Names of the set fields cors-agent does not enforce.
    pub fn ignored_fields(&self) -> Vec<&'static str> {
        let fields: [(&'static str, bool); 15] = [
            ("phase", self.phase.is_some()),
            ("transformation", self.transformation.is_some()),
            ("extProc", self.ext_proc.is_some()),
            ("extAuth", self.ext_auth.is_some()),
            ("rateLimit", self.rate_limit.is_some()),
            ("csrf", self.csrf.is_some()),
            ("headerModifiers", self.header_modifiers.is_some()),
            ("hostRewrite", self.host_rewrite.is_some()),
            ("timeouts", self.timeouts.is_some()),
            ("retry", self.retry.is_some()),
            ("authorization", self.authorization.is_some()),
            ("jwtAuthentication", self.jwt_authentication.is_some()),
            ("basicAuthentication", self.basic_authentication.is_some()),
            (
                "apiKeyAuthentication",
                self.api_key_authentication.is_some(),
            ),
            ("directResponse", self.direct_response.is_some()),
        ];
        fields
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(n, _)| n)
            .collect()
    }
}
