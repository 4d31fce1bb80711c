//! "Pods" for mesh tests (root only): network namespaces on a bridge, each with its own IP, the
//! sidecar's capture rules, an application (HTTP on 8080, TCP echo on 9000) and a `ferrum-dp
//! --mode sidecar` running as UID 1337; the API emulator (answering TokenReviews) and the
//! operator (snapshot + CA) run on the host, reachable from the pods at the bridge's address.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferrum_testkit::netns::{Bridge, Netns};

use crate::{Cluster, Operator, Proc, TOKEN_KEY, eventually, free_port, token, workspace_bin};

/// The namespace every test pod lives in.
pub const NS: &str = "mesh";

/// The pods' application, on IPv4 and IPv6: answers HTTP on 8080 with who it is, what it was
/// asked and from where (the peer address) — and, in response headers, whether the request
/// reached it with an `authorization` header, its `x-jwt-sub` and `traceparent`, and the body
/// of a POST — and echoes TCP on 9000.
pub const APP: &str = r#"
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name = sys.argv[1]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        peer = self.client_address[0].removeprefix("::ffff:")
        body = f"hello from {name}: {self.path} from {peer}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-saw-authorization", "yes" if self.headers.get("authorization") else "no")
        self.send_header("x-saw-sub", self.headers.get("x-jwt-sub", "-"))
        self.send_header("x-saw-traceparent", self.headers.get("traceparent", "-"))
        self.send_header("x-saw-authz-user", self.headers.get("x-authz-user", "-"))
        self.send_header("x-saw-xfcc", self.headers.get("x-forwarded-client-cert", "-"))
        self.send_header("x-saw-body", self.posted.decode(errors="replace") if self.posted else "-")
        self.end_headers()
        self.wfile.write(body)
    posted = b""
    def do_POST(self):
        self.posted = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.do_GET()
    def log_message(self, *a):
        pass
l = socket.socket(socket.AF_INET6); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
# A backlog no test's burst overflows: a dropped SYN is retried only after 1 s, then 3 s.
l.bind(("::", 9000)); l.listen(1024)
def echo():
    while True:
        c, _ = l.accept()
        def pump(c=c):
            while True:
                b = c.recv(65536)
                if not b:
                    c.shutdown(socket.SHUT_WR); c.close(); return
                c.sendall(b)
        threading.Thread(target=pump, daemon=True).start()
threading.Thread(target=echo, daemon=True).start()
class Dual(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
http = Dual(("::", 8080), H)
print("listening", flush=True)
http.serve_forever()
"#;

pub struct Pod {
    pub name: String,
    /// Its Kubernetes namespace.
    pub namespace: String,
    pub ip: String,
    pub ip6: String,
    pub ns: Netns,
    /// The host side of its veth (for captures).
    pub veth: String,
    pub sidecar: Option<Proc>,
    pub app: Option<Proc>,
    /// The sidecar's stderr.
    pub log: PathBuf,
    /// Its Pod object as applied (on node [`NODE`]).
    manifest: String,
}

/// The node every pod is scheduled on unless [`World::place`] moves it.
pub const NODE: &str = "node-1";

impl Pod {
    /// Runs a program inside the pod as its application would (UID 0: captured).
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.ns.cmd(args).output().unwrap()
    }

    pub fn sidecar_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sidecar's `ferrum_mesh_connections_total` for one direction and path.
    pub fn connections(&self, direction: &str, path: &str) -> f64 {
        self.metric(&format!(
            "ferrum_mesh_connections_total{{direction=\"{direction}\",path=\"{path}\"}}"
        ))
    }

    /// One series (name and labels, as exposed) of the sidecar's metrics.
    pub fn metric(&self, series: &str) -> f64 {
        let out = self.run(&["curl", "-sS", "http://127.0.0.1:15000/metrics"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from {text}"))
    }

    /// Sends `payload` 1,000 times to `host`:9000 (the echo port) from inside the pod, then
    /// half-closes; what came back as "<length> <payload>" ("<length> changed" when it is not the
    /// 1,000 payloads as sent).
    pub fn echo_bulk(&self, host: &str, payload: &str) -> String {
        let out = self.run(&[
            "python3",
            "-c",
            &format!(
                "import socket; s = socket.create_connection(('{host}', 9000), timeout=5)\n\
                 p = b'{payload}'; s.sendall(p * 1000); s.shutdown(socket.SHUT_WR)\n\
                 got = b''\nwhile True:\n    b = s.recv(65536)\n    if not b: break\n    got += b\n\
                 print(len(got), p.decode() if got == p * 1000 else 'changed')"
            ),
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `curl http://<service>.mesh.svc<path>` from inside the pod, the name resolved to `vip`.
    pub fn curl_svc(&self, service: &str, vip: &str, path: &str) -> (bool, String) {
        let vip = if vip.contains(':') {
            format!("[{vip}]")
        } else {
            vip.to_string()
        };
        self.curl(&[
            "--resolve",
            &format!("{service}.{NS}.svc:80:{vip}"),
            &format!("http://{service}.{NS}.svc{path}"),
        ])
    }

    /// `curl` from inside the pod: (exit success, body).
    pub fn curl(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["curl", "-sS", "--max-time", "5"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

pub struct World {
    // Field order is drop order: processes in pods before the pods, pods before the bridge.
    pub pods: Vec<Pod>,
    pub op: Operator,
    pub bridge: Bridge,
    pub cluster: Cluster,
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    operator_args: Vec<String>,
}

impl World {
    pub async fn start(operator_args: &[&str]) -> World {
        let cluster = Cluster::start_with(free_port(), &["--token-key", TOKEN_KEY]);
        // A /24 of its own per test (tests run in parallel).
        let bridge = Bridge::new(&ferrum_testkit::netns::unique_subnet());
        // The control plane over TLS from the mesh CA, as sidecars should see it.
        let mut args = vec!["--grpc-tls"];
        args.extend_from_slice(operator_args);
        let op = cluster.operator_at("op-1", &bridge.host_ip(), &args).await;
        let operator_args = args.iter().map(|a| a.to_string()).collect();
        let dir = tempfile::tempdir().unwrap();
        // The sidecars run as 1337: they read tokens and roots and write their caches here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let root = dir.path().join("root.pem");
        std::fs::write(&root, cluster.ca_root().await).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o644)).unwrap();
        cluster.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"));
        World {
            pods: Vec::new(),
            op,
            bridge,
            cluster,
            dir,
            root,
            operator_args,
        }
    }

    /// Stops the operator and starts it again on the same ports (sidecars reconnect to it).
    pub async fn restart_operator(&mut self) {
        self.op.kill();
        let ports = (self.op.grpc, self.op.admin, self.op.ca);
        let args: Vec<&str> = self.operator_args.iter().map(String::as_str).collect();
        self.op = self.cluster.operator_on("op-1", &self.op.host, ports, &args).await;
    }

    /// A pod at `<bridge>.<host>`, known to the cluster with its IP; when `mesh`, with the capture
    /// rules and the label that says peers reach it over HBONE. Returns its index.
    pub fn pod(&mut self, name: &str, sa: &str, app_label: &str, host: u8, mesh: bool) -> usize {
        self.pod_labelled(name, sa, &format!("app: {app_label}"), host, mesh)
    }

    /// [`World::pod`] with its labels as a YAML flow mapping's body (`app: b, version: v1`).
    pub fn pod_labelled(&mut self, name: &str, sa: &str, labels: &str, host: u8, mesh: bool) -> usize {
        self.pod_in(NS, name, sa, labels, host, mesh)
    }

    /// [`World::pod_labelled`] in Kubernetes namespace `namespace` (made if new).
    pub fn pod_in(&mut self, namespace: &str, name: &str, sa: &str, labels: &str, host: u8, mesh: bool) -> usize {
        let i = self.pod_unannounced(namespace, name, sa, labels, host, mesh);
        self.announce(i);
        i
    }

    /// [`World::pod_in`] not yet in the API: the pod's network (and whatever runs in it) exists
    /// before the operator can know the pod, until [`World::announce`].
    pub fn pod_unannounced(
        &mut self,
        namespace: &str,
        name: &str,
        sa: &str,
        labels: &str,
        host: u8,
        mesh: bool,
    ) -> usize {
        if namespace != NS {
            self.cluster.apply(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"
            ));
        }
        let (ns, veth) = self.bridge.pod(name, host);
        let ip = format!("{}.{host}", self.bridge.prefix);
        let ip6 = format!("{}{host}", self.bridge.prefix6);
        let tls = if mesh { ", security.istio.io/tlsMode: istio" } else { "" };
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}{tls}}}}}\n\
             spec: {{serviceAccountName: {sa}, nodeName: {NODE}, containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}, {{name: echo, containerPort: 9000}}]}}]}}\n\
             status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}, {{ip: '{ip6}'}}]}}\n"
        );
        if mesh {
            ns.exec(&[workspace_bin("ferrum-dp").to_str().unwrap(), "init-iptables"]);
        }
        let log = self.dir.path().join(format!("{name}.log"));
        self.pods.push(Pod {
            name: name.to_string(),
            namespace: namespace.to_string(),
            ip,
            ip6,
            ns,
            veth,
            sidecar: None,
            app: None,
            log,
            manifest,
        });
        self.pods.len() - 1
    }

    /// Puts pod `i` in the API.
    pub fn announce(&self, i: usize) {
        self.cluster.apply(&self.pods[i].manifest);
    }

    /// Moves pod `i` to node `node` (in the API: the same pod, scheduled there).
    pub fn place(&self, i: usize, node: &str) {
        let manifest = &self.pods[i].manifest;
        self.cluster
            .apply(&manifest.replace(&format!("nodeName: {NODE}"), &format!("nodeName: {node}")));
    }

    pub fn service(&self, name: &str, vip: &str, app_label: &str) {
        self.service_selecting(name, vip, &format!("app: {app_label}"))
    }

    /// A Service (ports 80 → http, 9000) whose selector is a YAML flow mapping's body.
    pub fn service_selecting(&self, name: &str, vip: &str, selector: &str) {
        self.service_with_vips(name, &[vip], selector)
    }

    /// [`World::service_selecting`] with its cluster IPs (two families: dual-stack).
    pub fn service_with_vips(&self, name: &str, vips: &[&str], selector: &str) {
        let ips: Vec<String> = vips.iter().map(|v| format!("'{v}'")).collect();
        self.cluster.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\n\
             spec: {{clusterIP: '{}', clusterIPs: [{}], selector: {{{selector}}}, ports: [{{name: http, port: 80, targetPort: http}}, {{name: echo, port: 9000, targetPort: 9000}}]}}\n",
            vips[0],
            ips.join(", ")
        ));
    }

    pub fn app(&mut self, i: usize) {
        let p = &mut self.pods[i];
        let mut child =
            p.ns.cmd(&["python3", "-c", APP, &p.name])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
        // Up only once both ports listen: a test that calls the moment the sidecars are ready
        // must not find the app still starting (a refused call is retried on another pod).
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening", "the app of {} started", p.name);
        p.app = Some(Proc(child));
    }

    /// Starts the pod's sidecar as UID 1337 with a token for its service account.
    pub fn sidecar(&mut self, i: usize, sa: &str, extra: &[&str]) {
        let ca = format!("{}:{}", self.op.host, self.op.ca.expect("operator_at gives a CA port"));
        let p = &self.pods[i];
        let tok = self.dir.path().join(format!("{}.token", p.name));
        std::fs::write(&tok, token(&p.namespace, sa, "ferrum-ca", 3600, TOKEN_KEY)).unwrap();
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cache = self.dir.path().join(format!("{}.json", p.name));
        let log = std::fs::File::create(&p.log).unwrap();
        let bin = workspace_bin("ferrum-dp");
        let mut cmd = p.ns.cmd(&["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"]);
        cmd.arg(bin)
            .args(["--mode", "sidecar", "--workers", "1", "--admin-addr", "127.0.0.1:15000"])
            .args(["--control-plane", &format!("https://{}:{}", self.op.host, self.op.grpc)])
            .args(["--ca-address", &ca])
            .args(["--ca-server-name", &self.op.host])
            .arg("--ca-root-file")
            .arg(&self.root)
            .arg("--token-file")
            .arg(&tok)
            .arg("--snapshot-cache")
            .arg(&cache)
            .args(["--pod-name", &p.name, "--pod-namespace", &p.namespace])
            .args(extra)
            .env("RUST_LOG", "info,ferrum_dp::mesh=debug")
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().unwrap();
        self.pods[i].sidecar = Some(Proc(child));
    }

    /// Waits until the pod's sidecar answers ready on 15021 (snapshot applied, certificate held).
    pub async fn ready(&self, i: usize) {
        let url = format!("http://{}:15021/healthz/ready", self.pods[i].ip);
        let what = format!("sidecar of {} ready", self.pods[i].name);
        eventually(&what, Duration::from_secs(20), async || {
            crate::client().get(&url).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// Pods A (`a-1`, index 0) and B (`b-1`, index 1), both with sidecars, and B's app behind
    /// Service `svc-b` at `vips` (one per family); both sidecars ready and A reaching svc-b at
    /// every VIP.
    pub async fn a_calls_b(vips: &[&str]) -> World {
        let mut w = World::start(&[]).await;
        let a = w.pod("a-1", "sa-a", "a", 10, true);
        let b = w.pod("b-1", "sa-b", "b", 11, true);
        w.service_with_vips("svc-b", vips, "app: b");
        w.app(b);
        w.sidecar(a, "sa-a", &[]);
        w.sidecar(b, "sa-b", &[]);
        w.ready(a).await;
        w.ready(b).await;
        for vip in vips {
            eventually(
                &format!("A reaches svc-b at {vip}"),
                Duration::from_secs(20),
                async || w.pods[a].curl_svc("svc-b", vip, "/warmup").0,
            )
            .await;
        }
        w
    }

    /// A capture on a pod's veth, stopped (and flushed) on [`Capture::finish`].
    pub fn capture(&self, i: usize) -> Capture {
        let file = self
            .dir
            .path()
            .join(format!("{}-{}.pcap", self.pods[i].name, free_port()));
        let mut child = Command::new("tcpdump")
            // Immediate mode: packets are written as they come, not when a kernel block fills.
            .args(["-i", &self.pods[i].veth, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (apt-get install tcpdump)");
        // Capturing starts when tcpdump says it listens (seconds on a loaded machine, so a
        // fixed pause missed packets); the rest of its stderr is drained.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("tcpdump did not start listening");
        Capture { child, file }
    }
}

pub struct Capture {
    child: std::process::Child,
    pub file: PathBuf,
}

impl Capture {
    /// Stops the capture; returns the raw capture and tcpdump's reading of it (one line per packet).
    pub fn finish(mut self) -> (Vec<u8>, String) {
        std::thread::sleep(Duration::from_millis(300));
        interrupt(self.child.id());
        let _ = self.child.wait();
        let raw = std::fs::read(&self.file).unwrap_or_default();
        let text = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        (raw, text)
    }
}

fn interrupt(pid: u32) {
    let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
}
