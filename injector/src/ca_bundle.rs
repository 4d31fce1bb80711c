//! Keeps the webhook configuration's `caBundle` on the self-signed CA: written at start and
//! re-asserted periodically, since `helm upgrade` or `kubectl apply` resets it.

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, Patch, PatchParams};

/// Sets every webhook's `clientConfig.caBundle` of `name` to `ca_pem`, when it differs.
pub async fn write(api: &Api<MutatingWebhookConfiguration>, name: &str, ca_pem: &str) -> Result<bool, kube::Error> {
    let current = api.get(name).await?;
    let want = ByteString(ca_pem.as_bytes().to_vec());
    let ops: Vec<serde_json::Value> = current
        .webhooks
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, w)| w.client_config.ca_bundle.as_ref() != Some(&want))
        .map(|(i, _)| {
            serde_json::json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": want,
            })
        })
        .collect();
    if ops.is_empty() {
        return Ok(false);
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops)).expect("well-formed patch");
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    Ok(true)
}

/// Writes the bundle now and then every `every`, forever; failures are logged and retried.
pub async fn keep(api: Api<MutatingWebhookConfiguration>, name: String, ca_pem: String, every: Duration) {
    loop {
        match write(&api, &name, &ca_pem).await {
            Ok(true) => tracing::info!(webhook_config = %name, "caBundle written"),
            Ok(false) => {}
            Err(e) => tracing::warn!(webhook_config = %name, error = %e, "cannot write the caBundle"),
        }
        tokio::time::sleep(every).await;
    }
}
