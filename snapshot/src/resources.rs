//! The translator's input: Kubernetes-style objects, from a cluster or from YAML files.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use gateway_api::experimental::tcproutes::TcpRoute;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use gateway_api::referencegrants::ReferenceGrant;
use gateway_api::tlsroutes::TlsRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use crate::crd::{Backend, BackendPolicy, MeshConfig, RateLimitPolicy};
use crate::istio::{
    AuthorizationPolicy, DestinationRule, PeerAuthentication, RequestAuthentication, ServiceEntry, Sidecar,
    VirtualService, WorkloadEntry,
};

/// Identifies one object in problems and status.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Everything the translator reads. The operator fills it from its reflectors' caches (sharing
/// the objects, not copying them); file mode from YAML documents.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub gateway_classes: Vec<Arc<GatewayClass>>,
    pub gateways: Vec<Arc<Gateway>>,
    pub http_routes: Vec<Arc<HttpRoute>>,
    pub grpc_routes: Vec<Arc<GrpcRoute>>,
    pub tls_routes: Vec<Arc<TlsRoute>>,
    pub tcp_routes: Vec<Arc<TcpRoute>>,
    pub reference_grants: Vec<Arc<ReferenceGrant>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub secrets: Vec<Arc<Secret>>,
    pub backends: Vec<Arc<Backend>>,
    pub backend_policies: Vec<Arc<BackendPolicy>>,
    pub rate_limit_policies: Vec<Arc<RateLimitPolicy>>,
    pub mesh_configs: Vec<Arc<MeshConfig>>,
    /// Workloads and their identities (the mesh reads these; gateways do not).
    pub pods: Vec<Arc<Pod>>,
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    /// Nodes: the zone of the workloads on each (`topology.kubernetes.io/zone`).
    pub nodes: Vec<Arc<Node>>,
    /// Istio security policies (security.istio.io, v1 or v1beta1).
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    pub request_authentications: Vec<Arc<RequestAuthentication>>,
    /// Istio Sidecars (networking.istio.io): which Services a workload's proxy knows.
    pub sidecars: Vec<Arc<Sidecar>>,
    /// Istio DestinationRules (networking.istio.io): traffic policy for Services.
    pub destination_rules: Vec<Arc<DestinationRule>>,
    /// Istio ServiceEntries (networking.istio.io): hosts outside the registry, for sidecars.
    pub service_entries: Vec<Arc<ServiceEntry>>,
    /// Istio VirtualServices (networking.istio.io): HTTP routes for Services, in the mesh.
    pub virtual_services: Vec<Arc<VirtualService>>,
    /// Istio WorkloadEntries (networking.istio.io): workloads outside Kubernetes (VMs).
    pub workload_entries: Vec<Arc<WorkloadEntry>>,
    /// Where each object came from (`file.yaml, document 3`), for error messages.
    pub origins: BTreeMap<ObjectRef, String>,
    /// JWKS documents the producer fetched for RequestAuthentications' `jwksUri`s, by URI: the
    /// translator puts them inline. Empty in file mode (the proxy fetches).
    pub jwks: Arc<crate::translate::Jwks>,
}

/// Every kind's field with its kind name and API group: what reading a file and the
/// whole-collection operations below walk, so adding a kind is one line here.
macro_rules! each_kind {
    ($m:ident) => {
        $m!(
            gateway_classes: "GatewayClass" in crate::GATEWAY_GROUP,
            gateways: "Gateway" in crate::GATEWAY_GROUP,
            http_routes: "HTTPRoute" in crate::GATEWAY_GROUP,
            grpc_routes: "GRPCRoute" in crate::GATEWAY_GROUP,
            tls_routes: "TLSRoute" in crate::GATEWAY_GROUP,
            tcp_routes: "TCPRoute" in crate::GATEWAY_GROUP,
            reference_grants: "ReferenceGrant" in crate::GATEWAY_GROUP,
            services: "Service" in "",
            endpoint_slices: "EndpointSlice" in "discovery.k8s.io",
            namespaces: "Namespace" in "",
            secrets: "Secret" in "",
            backends: "Backend" in crate::FERRUM_GROUP,
            backend_policies: "BackendPolicy" in crate::FERRUM_GROUP,
            rate_limit_policies: "RateLimitPolicy" in crate::FERRUM_GROUP,
            mesh_configs: "MeshConfig" in crate::FERRUM_GROUP,
            pods: "Pod" in "",
            service_accounts: "ServiceAccount" in "",
            nodes: "Node" in "",
            authorization_policies: "AuthorizationPolicy" in crate::ISTIO_SECURITY_GROUP,
            peer_authentications: "PeerAuthentication" in crate::ISTIO_SECURITY_GROUP,
            request_authentications: "RequestAuthentication" in crate::ISTIO_SECURITY_GROUP,
            sidecars: "Sidecar" in crate::ISTIO_NETWORKING_GROUP,
            destination_rules: "DestinationRule" in crate::ISTIO_NETWORKING_GROUP,
            service_entries: "ServiceEntry" in crate::ISTIO_NETWORKING_GROUP,
            virtual_services: "VirtualService" in crate::ISTIO_NETWORKING_GROUP,
            workload_entries: "WorkloadEntry" in crate::ISTIO_NETWORKING_GROUP
        )
    };
}

/// A kind's name as kept, and its API group.
fn kind_group(kind: &str) -> Option<(&'static str, &'static str)> {
    macro_rules! find {
        ($($field:ident: $kind:literal in $group:expr),+) => {
            match kind {
                $($kind => Some(($kind, $group)),)+
                _ => None,
            }
        };
    }
    each_kind!(find)
}

/// Every kind a file may hold.
const KINDS: &[&str] = {
    macro_rules! names {
        ($($field:ident: $kind:literal in $group:expr),+) => {
            &[$($kind),+]
        };
    }
    each_kind!(names)
};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{origin}: not valid YAML: {source}")]
    Yaml {
        origin: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{origin}: {what}")]
    Shape { origin: String, what: String },
    #[error("{origin}: {object}: {source}")]
    Object {
        origin: String,
        object: String,
        #[source]
        source: serde_path_to_error::Error<serde_yaml::Error>,
    },
    #[error("{second}: {object} is also defined at {first}")]
    Duplicate {
        object: String,
        first: String,
        second: String,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<MetaName>,
}

#[derive(Deserialize)]
struct MetaName {
    name: Option<String>,
    namespace: Option<String>,
}

/// The YAML files a path names: the file itself, or a directory's `*.yaml`/`*.yml` in name order.
fn yaml_files(path: &std::path::Path) -> Result<Vec<std::path::PathBuf>, LoadError> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let io = |source| LoadError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

impl Resources {
    /// Reads files and directories of YAML (file mode, `ferrumctl -f`).
    pub fn from_paths(paths: &[std::path::PathBuf]) -> Result<Resources, LoadError> {
        let mut res = Resources::default();
        for p in paths {
            for f in yaml_files(p)? {
                let text = std::fs::read_to_string(&f).map_err(|source| LoadError::Io {
                    path: f.display().to_string(),
                    source,
                })?;
                res.add_yaml(&f.display().to_string(), &text)?;
            }
        }
        Ok(res)
    }

    /// Adds every document of a multi-document YAML text. `source` names the text in errors.
    /// Objects without a namespace land in `default`, as `kubectl apply` would put them.
    pub fn add_yaml(&mut self, source: &str, text: &str) -> Result<(), LoadError> {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let origin = format!("{source}, document {}", i + 1);
            let value = serde_yaml::Value::deserialize(doc).map_err(|source| LoadError::Yaml {
                origin: origin.clone(),
                source,
            })?;
            if value.is_null() {
                continue; // empty document (`---` at the end)
            }
            self.add_value(&origin, value)?;
        }
        Ok(())
    }

    fn add_value(&mut self, origin: &str, mut value: serde_yaml::Value) -> Result<(), LoadError> {
        let shape = |what: String| LoadError::Shape {
            origin: origin.to_string(),
            what,
        };
        let meta: TypeMeta =
            serde_yaml::from_value(value.clone()).map_err(|e| shape(format!("not a Kubernetes object: {e}")))?;
        let api_version = meta.api_version.ok_or_else(|| shape("apiVersion is missing".into()))?;
        let kind = meta.kind.ok_or_else(|| shape("kind is missing".into()))?;
        if kind == "List" {
            let items = value
                .get("items")
                .and_then(|v| v.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                self.add_value(origin, item)?;
            }
            return Ok(());
        }
        let m = meta.metadata.ok_or_else(|| shape("metadata is missing".into()))?;
        let name = m.name.ok_or_else(|| shape("metadata.name is missing".into()))?;
        let cluster_scoped = matches!(kind.as_str(), "GatewayClass" | "Namespace");
        let namespace = if cluster_scoped {
            String::new()
        } else {
            m.namespace.unwrap_or_else(|| "default".into())
        };
        if !cluster_scoped && let Some(md) = value.get_mut("metadata").and_then(|v| v.as_mapping_mut()) {
            md.insert("namespace".into(), namespace.clone().into());
        }
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let Some((static_kind, expected_group)) = kind_group(&kind) else {
            return Err(shape(format!(
                "kind {kind:?} ({api_version}) is not supported; expected one of {}",
                KINDS.join(", ")
            )));
        };
        if group != expected_group {
            return Err(shape(format!(
                "{kind} {name}: apiVersion {api_version:?} is not in group {expected_group:?}"
            )));
        }
        let object = ObjectRef {
            kind: static_kind,
            namespace,
            name,
        };
        if let Some(first) = self.origins.get(&object) {
            return Err(LoadError::Duplicate {
                object: object.to_string(),
                first: first.clone(),
                second: origin.to_string(),
            });
        }
        let typed_err = |source| LoadError::Object {
            origin: origin.to_string(),
            object: object.to_string(),
            source,
        };
        self.push_object(static_kind, value).map_err(typed_err)?;
        self.origins.insert(object, origin.to_string());
        Ok(())
    }

    fn push_object(
        &mut self,
        kind: &str,
        value: serde_yaml::Value,
    ) -> Result<(), serde_path_to_error::Error<serde_yaml::Error>> {
        macro_rules! push {
            ($($field:ident: $kind:literal in $group:expr),+) => {
                match kind {
                    $($kind => self.$field.push(Arc::new(serde_path_to_error::deserialize(value)?)),)+
                    _ => unreachable!("kinds come from each_kind"),
                }
            };
        }
        each_kind!(push);
        Ok(())
    }

    pub fn origin(&self, object: &ObjectRef) -> Option<&str> {
        self.origins.get(object).map(String::as_str)
    }
}

fn object_ref(kind: &'static str, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
    }
}

impl Resources {
    /// Every object as one Kubernetes `List` (what `add_yaml` reads back), Secrets' values
    /// replaced: a view of what the translator reads that holds no key (`ferrumctl diff`).
    pub fn to_list(&self) -> serde_json::Value {
        let mut items: Vec<serde_json::Value> = Vec::new();
        macro_rules! list {
            ($($field:ident: $kind:literal in $group:expr),+) => {
                $(items.extend(self.$field.iter().filter_map(|o| serde_json::to_value(&**o).ok()));)+
            };
        }
        each_kind!(list);
        for item in items.iter_mut().filter(|i| i["kind"] == "Secret") {
            for field in ["data", "stringData"] {
                if let Some(values) = item.get_mut(field).and_then(|d| d.as_object_mut()) {
                    // "[redacted]", base64 (what `data` holds) and plain alike.
                    values.values_mut().for_each(|v| *v = "W3JlZGFjdGVkXQ==".into());
                }
            }
        }
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
    }

    /// Applies `other` over these objects: each of its objects replaces the one of the same
    /// kind, namespace and name, or is added (what `kubectl apply` of `other` would do).
    pub fn overlay(&mut self, other: Resources) {
        macro_rules! overlay {
            ($($field:ident: $kind:literal in $group:expr),+) => {
                $(
                    self.$field.retain(|o| !other.origins.contains_key(&object_ref($kind, &o.metadata)));
                    self.$field.extend(other.$field);
                )+
            };
        }
        each_kind!(overlay);
        self.origins.extend(other.origins);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_document_yaml_with_default_namespace() {
        let mut r = Resources::default();
        r.add_yaml(
            "a.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\n\
             spec: {gatewayClassName: ferrum, listeners: [{name: http, port: 8080, protocol: HTTP}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: apps}\nspec: {ports: [{port: 80}]}\n---\n",
        )
        .unwrap();
        assert_eq!(r.gateways.len(), 1);
        assert_eq!(r.gateways[0].metadata.namespace.as_deref(), Some("default"));
        assert_eq!(r.services[0].metadata.namespace.as_deref(), Some("apps"));
        let gw = ObjectRef {
            kind: "Gateway",
            namespace: "default".into(),
            name: "gw".into(),
        };
        assert_eq!(r.origin(&gw), Some("a.yaml, document 1"));
    }

    /// Every kind is read into its own collection; an unknown kind or a kind in the wrong API
    /// group is refused with the document's place and what is accepted.
    #[test]
    fn each_kind_has_its_group_and_others_are_refused() {
        let mut r = Resources::default();
        r.add_yaml(
            "k.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: a}\nspec: {}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: a}\nspec: {}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap();
        assert_eq!(
            (r.authorization_policies.len(), r.sidecars.len(), r.namespaces.len()),
            (1, 1, 1)
        );
        // Cluster-scoped: no namespace of its own.
        assert!(
            r.origins
                .keys()
                .any(|o| o.kind == "Namespace" && o.namespace.is_empty())
        );
        let refused = |doc: &str| Resources::default().add_yaml("x.yaml", doc).unwrap_err().to_string();
        let e = refused("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
        assert!(
            e.starts_with("x.yaml, document 1: kind \"Deployment\" (apps/v1) is not supported"),
            "{e}"
        );
        assert!(
            e.contains("GatewayClass, Gateway, HTTPRoute")
                && e.ends_with("Sidecar, DestinationRule, ServiceEntry, VirtualService, WorkloadEntry"),
            "{e}"
        );
        let e = refused("apiVersion: v1\nkind: HTTPRoute\nmetadata: {name: r}\n");
        assert!(e.ends_with("is not in group \"gateway.networking.k8s.io\""), "{e}");
    }

    #[test]
    fn a_list_reads_back_and_an_overlay_replaces_by_name() {
        let mut base = Resources::default();
        base.add_yaml(
            "cluster",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {name: tls}\nstringData: {tls.key: SECRET-KEY}\n",
        )
        .unwrap();
        let list = base.to_list();
        assert!(!list.to_string().contains("SECRET-KEY"), "{list}");
        let mut back = Resources::default();
        back.add_yaml("list", &list.to_string()).unwrap();
        assert_eq!((back.services.len(), back.secrets.len()), (2, 1));
        let mut files = Resources::default();
        files
            .add_yaml(
                "f.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 8080}]}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {name: c}\nspec: {ports: [{port: 80}]}\n",
            )
            .unwrap();
        back.overlay(files);
        let ports: Vec<(String, i32)> = back
            .services
            .iter()
            .map(|s| {
                (
                    s.metadata.name.clone().unwrap(),
                    s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
                )
            })
            .collect();
        assert_eq!(ports, [("a".into(), 80), ("b".into(), 8080), ("c".into(), 80)]);
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let mut r = Resources::default();
        let err = r
            .add_yaml(
                "routes.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\n\
                 apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bad}\n\
                 spec: {rules: [{matches: [{path: {type: Fuzzy, value: /}}]}]}\n",
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("routes.yaml, document 2: HTTPRoute default/bad:"),
            "{err}"
        );
        assert!(
            err.contains("spec.rules[0].matches[0].path.type") && err.contains("Fuzzy"),
            "{err}"
        );
    }

    #[test]
    fn rejects_unknown_kinds_duplicates_and_broken_yaml() {
        let mut r = Resources::default();
        let e = r
            .add_yaml("x.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p}\n")
            .unwrap_err();
        assert!(e.to_string().contains("kind \"ConfigMap\""), "{e}");
        let e = r
            .add_yaml("x.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [\n")
            .unwrap_err();
        assert!(e.to_string().starts_with("x.yaml, document 1: not valid YAML"), "{e}");
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n";
        r.add_yaml("a.yaml", svc).unwrap();
        let e = r.add_yaml("b.yaml", svc).unwrap_err();
        assert_eq!(
            e.to_string(),
            "b.yaml, document 1: Service default/s is also defined at a.yaml, document 1"
        );
        let e = r
            .add_yaml("c.yaml", "apiVersion: v1\nkind: HTTPRoute\nmetadata: {name: r}\n")
            .unwrap_err();
        assert!(
            e.to_string().contains("not in group \"gateway.networking.k8s.io\""),
            "{e}"
        );
    }
}
