//! The README's examples, run from the README's own text: what a newcomer
//! copies must work as written. Each code block is taken from README.md,
//! pointed at a gateway of the test's own (its address for 127.0.0.1:8080)
//! and at papers of its own (for `no01`, `no02`), then run with the real
//! program: node, Chromium, python3, the config loader.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{admin_sessions, run_client, unique, Client, Gateway};
use stompgate::config::Config;

const README: &str = include_str!("../README.md");

/// The fenced blocks of `language`, without their fence and with the
/// indentation of the opening fence removed (blocks inside list items).
fn blocks(language: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut lines = README.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed != format!("```{language}") {
            continue;
        }
        let indent = line.len() - trimmed.len();
        let mut block = String::new();
        for line in lines.by_ref() {
            if line.trim_start() == "```" {
                break;
            }
            block.push_str(line.get(indent..).unwrap_or(line.trim_start()));
            block.push('\n');
        }
        found.push(block);
    }
    assert!(!found.is_empty(), "README.md has no ```{language} block");
    found
}

/// A block pointed at `gw` and at papers no other test reads.
fn localized(block: &str, gw: &Gateway, papers: &str) -> String {
    let addr = gw.http_url("");
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let port = addr.rsplit(':').next().unwrap();
    block
        .replace("127.0.0.1:8080", addr)
        .replace("(\"127.0.0.1\", 8080)", &format!("(\"127.0.0.1\", {port})"))
        .replace("no01", &format!("{papers}no01"))
        .replace("no02", &format!("{papers}no02"))
}

/// A directory of its own under target/tmp, where `node_modules` is the
/// test clients' (ES modules resolve packages from the file's directory).
fn workdir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("readme"));
    std::fs::create_dir_all(&dir).unwrap();
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node_modules");
    assert!(
        modules.exists(),
        "{} is missing: run scripts/test (it installs the clients)",
        modules.display()
    );
    std::os::unix::fs::symlink(modules, dir.join("node_modules")).unwrap();
    dir
}

#[tokio::test]
async fn the_stompjs_example_runs_in_node() {
    let gw = Gateway::start().await;
    let papers = unique("js");
    let [example] = &blocks("js")[..] else {
        panic!("expected one ```js block");
    };
    let file = workdir().join("newspaper.mjs");
    std::fs::write(&file, localized(example, &gw, &papers)).unwrap();
    let printed = run_client("node", &[file.to_str().unwrap()]).await;
    assert_eq!(
        printed,
        format!("routed: true\n/sub/{papers}no01 1면: 오늘의 소식\n")
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_browser_example_runs_in_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} not found: run scripts/test (it installs Debian's chromium)"
    );
    let gw = Gateway::start().await;
    let papers = unique("html");
    let [example] = &blocks("html")[..] else {
        panic!("expected one ```html block");
    };
    let file = workdir().join("newspaper.html");
    std::fs::write(&file, localized(example, &gw, &papers)).unwrap();
    let script = format!(
        "{}/tests/clients/readme-browser.mjs",
        env!("CARGO_MANIFEST_DIR")
    );
    let printed = run_client("node", &[script.as_str(), file.to_str().unwrap(), "2"]).await;
    assert_eq!(
        printed,
        format!("routed: true\n/sub/{papers}no01 1면: 오늘의 소식\n")
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_stomp_py_example_runs() {
    let gw = Gateway::start().await;
    let papers = unique("py");
    let [example] = &blocks("python")[..] else {
        panic!("expected one ```python block");
    };
    let file = workdir().join("newspaper.py");
    std::fs::write(&file, localized(example, &gw, &papers)).unwrap();
    let printed = run_client("python3", &[file.to_str().unwrap()]).await;
    // The body names the paper too, so it was pointed at the test's.
    assert_eq!(printed, format!("/topic/{papers}no02 {papers}no02 only\n"));
    gw.stop().await;
}

/// Every TOML snippet is a configuration file the gateway accepts as is.
#[test]
fn the_configuration_snippets_load() {
    for snippet in blocks("toml") {
        let file = std::env::temp_dir().join(format!("{}.toml", unique("readme")));
        std::fs::write(&file, &snippet).unwrap();
        let loaded = Config::load_from(Some(&file), Some(Default::default()));
        std::fs::remove_file(&file).unwrap();
        if let Err(e) = loaded {
            panic!("README snippet refused: {e}\n{snippet}");
        }
    }
}

/// The `/admin/sessions` example has the fields the endpoint gives.
#[tokio::test]
async fn the_admin_sessions_example_has_the_real_fields() {
    let token = unique("token");
    let admin = token.clone();
    let gw = Gateway::start_with(move |c| c.server.admin_token = admin).await;
    let (mut client, _) = Client::connect(&gw).await;
    client
        .subscribe("paper", &format!("/sub/{}", unique("p")))
        .await;
    let real = admin_sessions(&gw, &token).await;
    let [example] = &blocks("json")[..] else {
        panic!("expected one ```json block");
    };
    let example: serde_json::Value = serde_json::from_str(example).expect("the example is JSON");
    let fields = |v: &serde_json::Value| -> BTreeSet<String> {
        v[0].as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(fields(&example), fields(&real), "real: {real}");
    let subscription = |v: &serde_json::Value| -> BTreeSet<String> {
        v[0]["subscriptions"][0]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(subscription(&example), subscription(&real));
    client.disconnect().await;
    gw.stop().await;
}
