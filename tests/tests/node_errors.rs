//! `cors-agent node` refuses bad input before attaching anything, with messages that name the
//! file, line, field path and reason (root only; these tests fail, not skip, without root).
#![cfg(target_os = "linux")]

use std::time::Duration;

use cors_agent_tests::agent::APP_ROUTE;
use cors_agent_tests::cluster::{Cluster, NodeAgent};
use cors_agent_tests::netns::require_root;

const EXIT_WITHIN: Duration = Duration::from_secs(20);

/// Runs the agent on `yaml` (with `routes.yaml` next to it) and returns its exit code and
/// stderr.
fn run(yaml: &str, wrapper: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.yaml"), APP_ROUTE).unwrap();
    let bad_route = APP_ROUTE.replace("https://app.example.com", "https://app.example.com/");
    std::fs::write(dir.path().join("bad-route.yaml"), bad_route).unwrap();
    let path = dir.path().join("node.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (status, log) = NodeAgent::run_to_exit(&path, wrapper, EXIT_WITHIN).expect("run");
    (status.code(), log)
}

#[test]
fn invalid_configurations_exit_2_naming_file_line_field_and_reason() {
    require_root();
    // A real pod namespace for the valid parts: should validation ever let a file through,
    // nothing outside the test's namespaces is touched.
    let cluster = Cluster::new(&["a"]).expect("cluster");
    let netns = cluster.pod("a").netns_path();
    let netns = netns.display();
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            format!(
                "resources: [routes.yaml]\npods:\n- name: a\n  netns: {netns}\n  ports: [{{port: 8080}}]\n- name: b\n  netns: /var/run/netns/cors-node-no-such-pod\n  ports: [{{port: 8080}}]\n"
            ),
            vec![
                "node.yaml:7: pods[1].netns: /var/run/netns/cors-node-no-such-pod does not exist"
                    .into(),
            ],
        ),
        (
            format!(
                "resources: [routes.yaml]\npods:\n- name: a\n  netns: {netns}\n  ports:\n  - port: 8080\n  - port: 8080\n"
            ),
            vec!["node.yaml:7: pods[0].ports[1].port: port 8080 is enrolled twice".into()],
        ),
        (
            format!(
                "resources: [routes.yaml]\npods:\n- name: a\n  netns: {netns}\n  ports:\n  - port: 8080\n    servce: app:8000\n"
            ),
            vec!["node.yaml:7: pods[0].ports[0].servce: unknown field \"servce\"".into()],
        ),
        (
            format!(
                "resources: [routes.yaml]\npods:\n- name: a\n  netns: {netns}\n  ports:\n  - port: 8080\n    service: app/8000\n"
            ),
            vec!["node.yaml:7: pods[0].ports[0].service: \"app/8000\": no port".into()],
        ),
        (
            format!(
                "resources: [routes.yaml]\npods:\n- name: a\n  netns: {netns}\n  ports:\n  - port: 8443\n    tls: {{cert: certs/a.pem, key: certs/a-key.pem}}\n"
            ),
            vec![
                "pods[0].ports[0].tls.cert:".into(),
                "certs/a.pem does not exist".into(),
                "pods[0].ports[0].tls.key:".into(),
            ],
        ),
        (
            format!(
                "resources: [routes.yaml]\nfailMode: sometimes\npods:\n- name: a\n  netns: {netns}\n  ports: [{{port: 8080}}]\n"
            ),
            vec![
                "node.yaml:2: failMode: unknown variant `sometimes`, expected `open` or `closed`"
                    .into(),
            ],
        ),
        (
            format!(
                "resources: [bad-route.yaml]\npods:\n- name: a\n  netns: {netns}\n  ports: [{{port: 8080}}]\n"
            ),
            vec![
                "bad-route.yaml:".into(),
                "spec.rules[0].filters[0].cors.allowOrigins[0]".into(),
            ],
        ),
    ];
    for (yaml, wanted) in cases {
        let (code, log) = run(&yaml, &[]);
        assert_eq!(code, Some(2), "exit code for:\n{yaml}\nlog:\n{log}");
        for want in &wanted {
            assert!(
                log.contains(want.as_str()),
                "{want:?} missing for:\n{yaml}\nlog:\n{log}"
            );
        }
        assert!(log.contains("not starting"), "{log}");
        assert!(
            !log.contains("steering attached"),
            "nothing attached:\n{log}"
        );
    }
}

#[test]
fn missing_capabilities_are_named() {
    require_root();
    let cluster = Cluster::new(&["a"]).expect("cluster");
    let yaml = format!(
        "resources: [routes.yaml]\npods:\n- name: a\n  netns: {}\n  ports: [{{port: 8080}}]\n",
        cluster.pod("a").netns_path().display()
    );
    // As root, but without the capabilities steering needs.
    let (code, log) = run(
        &yaml,
        &[
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-bpf,-net_admin,-sys_admin",
            "--",
        ],
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("missing capabilities CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"),
        "{log}"
    );
    assert!(!log.contains("steering attached"), "{log}");
}
