//! `cargo xtask demo`: a small demo app behind `cors-agent proxy` with the guide's policy
//! (`examples/httpbin.yaml`), and the curl commands that show what the agent does.
//! `--smoke` sends those requests itself, checks the answers and exits.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::{target_dir, workspace_root};

#[derive(clap::Args)]
pub struct Demo {
    /// Send the demo's requests, check the answers, and exit (on free ports: --port and
    /// --app-port are ignored).
    #[arg(long)]
    smoke: bool,
    /// Port for the agent (0: any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Port for the demo app (0: any free port).
    #[arg(long, default_value_t = 8000)]
    app_port: u16,
}

/// Kills the agent when the demo ends, however it ends.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: Demo) -> Result<()> {
    let root = workspace_root();
    println!("building cors-agent (the first build takes a few minutes)...");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "cors-agent"])
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build -p cors-agent failed");
    let binary = target_dir().join("debug/cors-agent");

    let (agent_port, app_port) = if args.smoke {
        (free_port()?, free_port()?)
    } else {
        (args.port, args.app_port)
    };
    let app = TcpListener::bind(("127.0.0.1", app_port)).with_context(|| {
        format!("demo app: cannot listen on 127.0.0.1:{app_port} (try --app-port)")
    })?;
    let app_addr = app.local_addr()?;
    thread::spawn(move || serve_demo_app(app));

    let agent_addr: SocketAddr = ([127, 0, 0, 1], agent_port).into();
    // Readiness is "the port accepts connections": another program on the port would pass it.
    drop(
        TcpListener::bind(agent_addr)
            .with_context(|| format!("cors-agent: cannot listen on {agent_addr} (try --port)"))?,
    );
    let resources = root.join("examples/httpbin.yaml");
    let mut command = Command::new(&binary);
    // The agent must not outlive the demo, also when the demo is killed by a signal.
    // SAFETY: the closure only makes one async-signal-safe system call (prctl).
    unsafe {
        command.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                .map_err(std::io::Error::from)
        });
    }
    let mut agent = Agent(
        command
            .arg("proxy")
            .args(["--listen", &agent_addr.to_string()])
            .args(["--upstream", &app_addr.to_string()])
            .arg("-f")
            .arg(&resources)
            .stdout(if args.smoke {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .stderr(if args.smoke {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?,
    );
    wait_for_port(agent_addr, Duration::from_secs(20))?;
    if let Some(status) = agent.0.try_wait()? {
        bail!("cors-agent exited at start: {status}");
    }

    let requests = demo_requests();
    if args.smoke {
        for r in &requests {
            let answer = send(agent_addr, r.raw)?;
            (r.check)(&answer)
                .with_context(|| format!("demo request {:?}:\n{}", r.title, answer))?;
            println!("ok: {}", r.title);
        }
        drop(agent);
        println!(
            "demo smoke: {} requests answered as expected",
            requests.len()
        );
        return Ok(());
    }

    println!(
        "\ncors-agent listens on http://{agent_addr}, in front of a demo app on http://{app_addr},\n\
         with the policies of {}. Try:\n",
        relative(&resources, &root)
    );
    for r in &requests {
        println!(
            "# {}\n{}\n",
            r.title,
            r.curl.replace("ADDR", &agent_addr.to_string())
        );
    }
    println!("Press Ctrl-C to stop.");
    let status = agent.0.wait()?;
    bail!("cors-agent exited: {status}")
}

fn relative(p: &Path, root: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

struct DemoRequest {
    title: &'static str,
    curl: &'static str,
    raw: &'static str,
    check: fn(&str) -> Result<()>,
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.lines().take_while(|l| !l.is_empty()).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn demo_requests() -> Vec<DemoRequest> {
    vec![
        DemoRequest {
            title: "an allowed preflight: answered by cors-agent, never reaches the app",
            curl: "curl -si -X OPTIONS http://ADDR/get -H 'Host: www.example.com' \\\n  -H 'Origin: https://example.com' -H 'Access-Control-Request-Method: GET'",
            raw: "OPTIONS /get HTTP/1.1\r\nHost: www.example.com\r\nOrigin: https://example.com\r\nAccess-Control-Request-Method: GET\r\nConnection: close\r\n\r\n",
            check: |a| {
                ensure!(a.starts_with("HTTP/1.1 200"), "expected 200");
                ensure!(
                    header(a, "access-control-allow-origin") == Some("https://example.com"),
                    "expected the origin echoed"
                );
                ensure!(
                    header(a, "access-control-allow-methods") == Some("GET,POST,OPTIONS"),
                    "expected the configured methods"
                );
                ensure!(
                    header(a, "x-demo-app").is_none(),
                    "the preflight reached the app"
                );
                Ok(())
            },
        },
        DemoRequest {
            title: "a denied preflight: 200 without any access-control-* header, so the browser blocks the call",
            curl: "curl -si -X OPTIONS http://ADDR/get -H 'Host: www.example.com' \\\n  -H 'Origin: https://notallowed.com' -H 'Access-Control-Request-Method: GET'",
            raw: "OPTIONS /get HTTP/1.1\r\nHost: www.example.com\r\nOrigin: https://notallowed.com\r\nAccess-Control-Request-Method: GET\r\nConnection: close\r\n\r\n",
            check: |a| {
                ensure!(a.starts_with("HTTP/1.1 200"), "expected 200");
                ensure!(
                    !a.to_ascii_lowercase().contains("access-control-"),
                    "expected no access-control-* header"
                );
                Ok(())
            },
        },
        DemoRequest {
            title: "an actual request: forwarded; the app's own `access-control-allow-origin: *` is replaced",
            curl: "curl -si http://ADDR/get -H 'Host: www.example.com' -H 'Origin: https://example.com'",
            raw: "GET /get HTTP/1.1\r\nHost: www.example.com\r\nOrigin: https://example.com\r\nConnection: close\r\n\r\n",
            check: |a| {
                ensure!(a.starts_with("HTTP/1.1 200"), "expected 200");
                ensure!(
                    header(a, "x-demo-app").is_some(),
                    "expected the app's answer"
                );
                ensure!(
                    header(a, "access-control-allow-origin") == Some("https://example.com"),
                    "expected the origin echoed, not *"
                );
                ensure!(
                    header(a, "access-control-allow-credentials") == Some("true"),
                    "expected credentials allowed"
                );
                Ok(())
            },
        },
    ]
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(addr: SocketAddr, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("cors-agent did not accept connections on {addr} within {limit:?}")
}

fn send(addr: SocketAddr, raw: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.replace("\r\n", "\n"))
}

/// A stand-in for httpbin: echoes the request headers as JSON and, like httpbin, allows every
/// origin on its own, so the demo shows the agent replacing that.
fn serve_demo_app(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            let _ = answer_one(stream);
        });
    }
}

fn answer_one(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((n, v)) = line.trim_end().split_once(':') {
            headers.push(format!("    {:?}: {:?}", n.trim(), v.trim()));
        }
    }
    let body = format!("{{\n  \"headers\": {{\n{}\n  }}\n}}\n", headers.join(",\n"));
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         access-control-allow-origin: *\r\nx-demo-app: httpbin-like\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}
