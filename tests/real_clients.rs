//! The gateway with clients that exist, unmodified: @stomp/stompjs (with
//! the `ws` package, as in Node or a browser) and stomp.py's WSConnection.
//! Each runs the newspaper script in tests/clients/ against an in-process
//! gateway; scripts/test installs them (npm ci, pip install).

mod common;

use std::path::Path;

use common::{run_client, unique, Gateway, Node};

async fn run(program: &str, args: &[String]) {
    println!("{}", run_client(program, args).await);
}

#[tokio::test]
async fn stompjs_newspaper() {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node_modules/@stomp");
    assert!(
        modules.exists(),
        "@stomp/stompjs is not installed: run scripts/test, or `npm ci --prefix tests/clients`"
    );
    let gw = Gateway::start().await;
    let script = format!("{}/tests/clients/newspaper.mjs", env!("CARGO_MANIFEST_DIR"));
    run("node", &[script, gw.ws_url(), unique("js")]).await;
    gw.stop().await;
}

#[tokio::test]
async fn stomp_py_newspaper() {
    let gw = Gateway::start().await;
    let script = format!("{}/tests/clients/newspaper.py", env!("CARGO_MANIFEST_DIR"));
    let port = gw.addr.port().to_string();
    run("python3", &[script, "127.0.0.1".into(), port, unique("py")]).await;
    gw.stop().await;
}

/// The demo page at `/` in headless Chromium (Debian's, driven by
/// playwright-core), on two nodes (this process's and a process of its
/// own): two pages on no01, one per node, and one on no02; a line
/// published to no01 shows on exactly the first two, and each page shows
/// who reads its paper, across nodes. Screenshots go to
/// target/tmp/browser/ for a person to look at.
#[tokio::test]
async fn demo_page_in_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} not found: run scripts/test (it installs Debian's chromium)"
    );
    let gw = Gateway::start().await;
    let node2 = Node::spawn(&[]);
    let script = format!("{}/tests/clients/browser.mjs", env!("CARGO_MANIFEST_DIR"));
    let out = format!("{}/browser", env!("CARGO_TARGET_TMPDIR"));
    let (base1, base2) = (gw.http_url(""), node2.gateway.http_url(""));
    run("node", &[script, base1, base2, out.clone(), unique("b")]).await;
    for shot in ["demo-reader1-no01.png", "demo-reader3-no02.png"] {
        let path = Path::new(&out).join(shot);
        assert!(path.exists(), "screenshot {} missing", path.display());
        println!("screenshot: {}", path.display());
    }
    gw.stop().await;
}
