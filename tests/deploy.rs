//! What ships for deployment, checked without a Docker engine: the compose
//! file against the Compose specification (the `compose_spec` crate, the
//! schema `docker compose` v2 follows) for every profile, the HAProxy
//! configuration with `haproxy -c`, the alert rules with `promtool check
//! rules` and their unit tests with `promtool test rules`, and every metric
//! the rules and the Grafana dashboard name against a real gateway's
//! `/metrics`. `.ci/run` runs this first, as its compose gate.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

use common::{scrape, Gateway};
use compose_spec::service::ports;
use compose_spec::{Compose, Service};
use stompgate::config::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Compose's interpolation of `${VAR:-default}` and `${VAR}` with nothing
/// set, as `docker compose` does on a machine with no such variables.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("an unclosed ${") + start;
        let inner = &rest[start + 2..end];
        if let Some((_, default)) = inner.split_once(":-") {
            out.push_str(default);
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn compose() -> Compose {
    let text = interpolate(&read("docker-compose.yml"));
    Compose::options()
        .apply_merge(true)
        .from_yaml_str(&text)
        .unwrap_or_else(|e| panic!("docker-compose.yml is not a valid Compose file: {e}"))
}

/// The services `docker compose --profile …` starts.
fn active<'a>(compose: &'a Compose, profiles: &[&str]) -> Vec<(String, &'a Service)> {
    compose
        .services
        .iter()
        .filter(|(_, s)| {
            s.profiles.is_empty() || s.profiles.iter().any(|p| profiles.contains(&p.as_str()))
        })
        .map(|(name, s)| (name.to_string(), s))
        .collect()
}

fn environment(service: &Service) -> HashMap<String, String> {
    service
        .environment
        .clone()
        .into_map()
        .expect("environment as a map")
        .into_iter()
        .map(|(k, v)| {
            let value = v.map(|v| v.to_string()).unwrap_or_default();
            (k.to_string(), value)
        })
        .collect()
}

#[test]
fn the_compose_file_is_valid_for_every_profile() {
    let compose = compose();
    compose
        .validate_all()
        .unwrap_or_else(|e| panic!("docker-compose.yml: {e}"));
    let defaults = Config::defaults().unwrap();
    for (profiles, published) in [
        (&[][..], &[8080, 15672][..]),
        (&["cluster"][..], &[8080, 15672][..]),
        (&["observability"][..], &[8080, 15672, 9090, 3000][..]),
        (
            &["cluster", "observability"][..],
            &[8080, 15672, 9090, 3000][..],
        ),
    ] {
        let services = active(&compose, profiles);
        let names: BTreeSet<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
        let mut host_ports = Vec::new();
        for (name, service) in &services {
            for dependency in service.depends_on.clone().into_long().keys() {
                assert!(
                    names.contains(dependency.as_str()),
                    "{profiles:?}: {name} depends on {dependency}, which does not run"
                );
            }
            for port in ports::into_long_iter(service.ports.clone()) {
                let published = port.published.expect("a published port").start();
                host_ports.push(published);
            }
            // Files mounted from the repository exist.
            for mount in compose_spec::service::volumes::into_long_iter(service.volumes.clone()) {
                if let compose_spec::service::volumes::Mount::Bind(bind) = mount {
                    let source = bind.source.as_path().to_path_buf();
                    assert!(
                        Path::new(ROOT).join(&source).exists(),
                        "{name} mounts {} which is not in the repository",
                        source.display()
                    );
                }
            }
        }
        host_ports.sort();
        let mut want = published.to_vec();
        want.sort();
        // Only what a person opens; never AMQP (a local broker holds 5672).
        assert_eq!(host_ports, want, "{profiles:?}: published host ports");
        // A balancer in front of two gateway nodes.
        let gateways: Vec<_> = services
            .iter()
            .filter(|(n, _)| n.starts_with("gateway-"))
            .collect();
        assert_eq!(gateways.len(), 2, "{profiles:?}: two gateway nodes");
        assert!(names.contains("lb"), "{profiles:?}: a load balancer");
        for (name, gateway) in gateways {
            assert!(
                gateway.ports.is_empty(),
                "{name} is reached through the balancer"
            );
            let grace = gateway.stop_grace_period.expect("a stop_grace_period");
            assert!(
                grace > defaults.server.shutdown_timeout,
                "{name}: stop_grace_period {grace:?} is not longer than server.shutdown_timeout"
            );
            // Its settings load, and name every broker node of the cluster.
            let env = environment(gateway);
            let config = Config::load_from(None, Some(env.clone()))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let hosts: BTreeSet<String> = config
                .amqp
                .all_urls()
                .map(|u| {
                    u.split('@')
                        .nth(1)
                        .unwrap()
                        .split(':')
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            let brokers: BTreeSet<String> = compose
                .services
                .keys()
                .filter(|n| n.as_str().starts_with("rabbitmq"))
                .map(|n| n.to_string())
                .collect();
            assert_eq!(hosts, brokers, "{name}: amqp.url and amqp.urls");
        }
    }
    // The cluster profile adds two broker nodes to the first.
    let cluster = active(&compose, &["cluster"]);
    let brokers = cluster.iter().filter(|(n, _)| n.starts_with("rabbitmq"));
    assert_eq!(brokers.count(), 3);
}

#[test]
fn the_balancer_config_passes_haproxy_check_and_names_every_gateway() {
    let output = Command::new("haproxy")
        .args(["-c", "-f", "deploy/haproxy/haproxy.cfg"])
        .current_dir(ROOT)
        .output()
        .expect("run haproxy (scripts/test installs Debian's haproxy)");
    assert!(
        output.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config = read("deploy/haproxy/haproxy.cfg");
    let servers: BTreeSet<&str> = config
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let compose = compose();
    let gateways: BTreeSet<&str> = compose
        .services
        .keys()
        .map(|k| k.as_str())
        .filter(|n| n.starts_with("gateway-"))
        .collect();
    assert_eq!(servers, gateways);
}

fn promtool(args: &[&str]) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(Path::new(ROOT).join("deploy/prometheus"))
        .output()
        .expect("run promtool (scripts/test installs Debian's prometheus)");
    assert!(
        output.status.success(),
        "promtool {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);
    promtool(&["check", "config", "--syntax-only", "prometheus.yml"]);
}

/// `stompgate_*` names in a text, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("stompgate_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let name = name.strip_suffix("_bucket").unwrap_or(&name).to_owned();
        names.insert(name);
    }
    names
}

#[tokio::test]
async fn the_rules_and_the_dashboard_name_metrics_that_exist() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/stompgate.json"))
            .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "stompgate");
    let gw = Gateway::start().await;
    let served: BTreeSet<String> = scrape(&gw)
        .await
        .keys()
        .map(|series| series.split('{').next().unwrap().to_owned())
        .map(|n| n.strip_suffix("_bucket").map(str::to_owned).unwrap_or(n))
        .collect();
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/dashboards/stompgate.json",
    ] {
        let named = metric_names(&read(file));
        assert!(!named.is_empty(), "{file} names no metric");
        let missing: Vec<_> = named.difference(&served).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics /metrics lacks: {missing:?}"
        );
    }
    gw.stop().await;
}
