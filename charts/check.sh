#!/usr/bin/env bash
# Checks the chart: CRDs identical to crds/ (generated from the Rust types), helm lint --strict,
# the default values and every optional part on (ci/all-on.yaml) rendered and validated — core
# kinds with kubernetes-validate --strict, our and the Gateway API's kinds against their CRDs —
# and a typo in values refused by values.schema.json.
# usage: charts/check.sh HELM VENV
set -euo pipefail
cd "$(dirname "$0")"
helm_bin=$1 venv=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export HELM_CACHE_HOME=$tmp/cache HELM_CONFIG_HOME=$tmp/config HELM_DATA_HOME=$tmp/data
chart=ferrum-mesh
diff -r ../crds $chart/crds >/dev/null || { echo "charts/$chart/crds differs from crds/: run make crds"; exit 1; }
for values in "" "$chart/ci/all-on.yaml"; do
  args=(${values:+-f "$values"})
  "$helm_bin" lint --strict "$chart" "${args[@]}"
  out=$tmp/rendered.yaml
  "$helm_bin" template ferrum "$chart" --namespace ferrum-system --kube-version 1.32.0 "${args[@]}" >"$out"
  "$venv/bin/kubernetes-validate" --strict --quiet -k 1.32.0 "$out"
  "$venv/bin/python" validate_crs.py "$out" ../crds/*.yaml ../../shared/testdata/gateway-api-v1.4.0-standard.yaml
done
if "$helm_bin" template ferrum "$chart" --set operator.replica=3 >/dev/null 2>&1; then
  echo "a typo in values (operator.replica) was accepted"; exit 1
fi
echo "chart ok"
