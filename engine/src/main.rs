//! The `switchyard` command line. Library code returns typed errors; this edge renders them for
//! people (miette) and turns them into exit codes.

use clap::{Parser, Subcommand, ValueEnum};
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource};
use std::fmt;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

mod cli;
use switchyard::build::Shared;
use switchyard::config::Diagnostic;
use switchyard::pipeline::load;
use switchyard::schema;
use switchyard::testing;

// mimalloc: the engine allocates many small JSON values per message; the system allocator was a
// quarter of the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Declarative pipelines that keep retail ERP, POS and marketplace systems in sync")]
struct Cli {
    /// Log level for messages on stderr (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check pipelines: format, referenced files, JSONPaths, scripts, routes, schemas. Exit 1 on problems.
    Validate {
        /// Pipeline files or folders (default: pipelines/).
        paths: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "human")]
        format: OutputFormat,
    },
    /// Show the RabbitMQ exchanges, queues and bindings the pipelines declare, and where each
    /// `amqp` source and sink reads and writes.
    Topology {
        /// Pipeline files or folders (default: pipelines/).
        paths: Vec<PathBuf>,
    },
    /// Run the tests stored beside each pipeline (`<name>.test.yaml`).
    Test {
        /// Test files, pipeline files or folders (default: pipelines/).
        paths: Vec<PathBuf>,
        /// Also write a JUnit XML report here.
        #[arg(long)]
        junit: Option<PathBuf>,
    },
    /// Run pipelines continuously over the durable store (Ctrl-C or SIGTERM stops cleanly).
    Run {
        /// Pipeline files or folders (default: pipelines/).
        paths: Vec<PathBuf>,
        /// Process everything available now, print a summary per pipeline, and exit.
        #[arg(long)]
        once: bool,
        /// The data directory: the store (queues, exceptions, checkpoints) and file sink outputs.
        #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = ".switchyard")]
        data_dir: PathBuf,
        /// Where shared state (idempotency keys) lives when several engines share it:
        /// `postgres://user@host/db` (`?schema=NAME` picks the schema, default `switchyard`).
        /// Default: the embedded store in the data directory.
        #[arg(long, env = "SWITCHYARD_STORE", hide_env_values = true)]
        store: Option<String>,
        /// Where the HTTP server for `http` sources listens (only when a pipeline has one).
        #[arg(long, env = "SWITCHYARD_LISTEN", default_value = switchyard::runtime::http_server::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
    },
    /// Send messages to a queue: each file (JSON: one message; NDJSON: one per line; CSV: one per
    /// row), or standard input as NDJSON.
    Send {
        queue: String,
        files: Vec<PathBuf>,
        /// How to split the input (default: from the file extension).
        #[arg(long, value_enum)]
        format: Option<cli::ops::SendFormat>,
        #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = ".switchyard")]
        data_dir: PathBuf,
    },
    /// Show each queue: messages ready, in flight, delayed for retry, and the oldest one's age.
    Queues {
        #[command(subcommand)]
        command: Option<cli::ops::QueuesCommand>,
        #[arg(long, value_enum, default_value = "human")]
        format: cli::ops::Listing,
        #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = ".switchyard", global = true)]
        data_dir: PathBuf,
    },
    /// List, show, replay, discard and export exception records.
    Exceptions {
        #[command(subcommand)]
        command: cli::ops::ExceptionsCommand,
        #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = ".switchyard", global = true)]
        data_dir: PathBuf,
        /// The shared store the engines write exception records to, as for `run` (default: the
        /// embedded store of the data directory).
        #[arg(long, env = "SWITCHYARD_STORE", hide_env_values = true, global = true)]
        store: Option<String>,
    },
    /// The sinks of the running engines: circuit breakers, rate limits, pauses the receivers
    /// asked for, and their last failures.
    Status {
        #[arg(long, value_enum, default_value = "human")]
        format: cli::ops::Listing,
        #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = ".switchyard")]
        data_dir: PathBuf,
    },
    /// Look up or forget an idempotency key (to deliver an order again on purpose).
    Keys {
        #[command(subcommand)]
        command: cli::ops::KeysCommand,
        #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = ".switchyard", global = true)]
        data_dir: PathBuf,
        /// The shared state store, as for `run` (default: the embedded store).
        #[arg(long, env = "SWITCHYARD_STORE", hide_env_values = true, global = true)]
        store: Option<String>,
    },
    /// Serve a simulated ERP (OAuth2 token endpoint, sales orders kept once per idempotency key)
    /// and marketplace (order acknowledgements), with latency, errors and a rate limit, for demos
    /// and tests of the HTTP edges.
    Simulate(cli::simulate::Simulation),
    /// Print the JSON Schema of the pipeline format (or of field maps, or of test files).
    Schema {
        #[arg(long, value_enum, default_value = "pipeline")]
        kind: schema::Kind,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Human,
    Json,
}

fn default_paths(paths: Vec<PathBuf>) -> Vec<PathBuf> {
    if paths.is_empty() { vec![PathBuf::from("pipelines")] } else { paths }
}

/// A diagnostic as miette renders it: the offending line, an arrow, what was expected, the hint.
struct Rendered {
    diag: Diagnostic,
    source: NamedSource<String>,
}

impl fmt::Debug for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.diag)
    }
}

impl fmt::Display for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.diag.location(), self.diag.message)?;
        if !self.diag.key_path.is_empty() {
            write!(f, " (at `{}`)", self.diag.key_path)?;
        }
        Ok(())
    }
}

impl std::error::Error for Rendered {}

impl miette::Diagnostic for Rendered {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(format!("switchyard::{}", self.diag.code.as_str())))
    }
    fn severity(&self) -> Option<miette::Severity> {
        Some(if self.diag.warning { miette::Severity::Warning } else { miette::Severity::Error })
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.diag.hint.as_ref().map(|h| Box::new(h.clone()) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        (!self.source.inner().is_empty()).then_some(&self.source as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let d = &self.diag;
        let label = match &d.expected {
            Some(e) => format!("expected {e}"),
            None => "here".to_string(),
        };
        let mut labels = vec![LabeledSpan::new_primary_with_span(Some(label), (d.span.offset, d.span.len.max(1)))];
        if let Some((span, text)) = &d.related {
            labels.push(LabeledSpan::new_with_span(Some(text.clone()), (span.offset, span.len.max(1))));
        }
        Some(Box::new(labels.into_iter()))
    }
}

fn render(diags: &[Diagnostic]) -> String {
    let theme = if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let handler = GraphicalReportHandler::new_themed(theme).with_context_lines(1);
    let mut out = String::new();
    for d in diags {
        let r = Rendered { source: NamedSource::new(d.source.path.display().to_string(), d.source.text.to_string()), diag: d.clone() };
        let _ = handler.render_report(&mut out, &r);
        out.push('\n');
    }
    out
}

/// Loads the pipelines under `paths`; a path that cannot be read is exit code 2.
fn load_paths(paths: &[PathBuf]) -> Result<load::Loaded, ExitCode> {
    load::load_all(paths, &Shared::with_process_env()).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn cmd_topology(paths: Vec<PathBuf>) -> ExitCode {
    let loaded = match load_paths(&default_paths(paths)) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if !loaded.diagnostics.is_empty() {
        eprint!("{}", render(&loaded.diagnostics));
        return ExitCode::from(1);
    }
    let mut any = false;
    for p in &loaded.pipelines {
        let Some(b) = &p.broker else { continue };
        any = true;
        println!("{} ({}) on {}", p.name, p.file.display(), switchyard::amqp::redact(&b.url));
        for line in b.topology.lines() {
            println!("  {line}");
        }
        if let Some(s) = &b.source {
            let retries: Vec<String> = s.retries.iter().map(|r| r.queue.clone()).collect();
            println!(
                "  consumes {} (prefetch {}); retries through [{}]; dead letters to {}",
                s.queue,
                s.prefetch,
                retries.join(", "),
                s.dead_letter_queue
            );
        }
        for (name, t) in &b.targets {
            println!("  sink {name} publishes to {}", t.describe());
        }
    }
    if !any {
        println!("no pipeline here uses RabbitMQ (a `broker:` block with `amqp` sources or sinks)");
    }
    ExitCode::SUCCESS
}

fn cmd_validate(paths: Vec<PathBuf>, format: OutputFormat) -> ExitCode {
    let loaded = match load_paths(&default_paths(paths)) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let bad_files: std::collections::BTreeSet<String> = loaded.diagnostics.iter().map(|d| d.source.path.display().to_string()).collect();
    match format {
        OutputFormat::Json => {
            let report = serde_json::json!({
                "valid": loaded.diagnostics.is_empty(),
                "files": loaded.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
                "pipelines": loaded.pipelines.iter().map(|p| serde_json::json!({"name": p.name, "version": p.version, "file": p.file.display().to_string()})).collect::<Vec<_>>(),
                "problems": loaded.diagnostics.iter().map(Diagnostic::to_json).collect::<Vec<_>>(),
                "warnings": loaded.warnings.iter().map(Diagnostic::to_json).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
        }
        OutputFormat::Human => {
            eprint!("{}", render(&loaded.diagnostics));
            eprint!("{}", render(&loaded.warnings));
            let warned = if loaded.warnings.is_empty() { String::new() } else { format!(", {} warning(s)", loaded.warnings.len()) };
            if loaded.diagnostics.is_empty() {
                println!("{} pipeline file(s) checked: all valid{warned}", loaded.files.len());
                for p in &loaded.pipelines {
                    println!("  ok  {} {} ({})", p.name, p.version, p.file.display());
                }
            } else {
                println!(
                    "{} pipeline file(s) checked: {} problem(s) in {} file(s){warned}",
                    loaded.files.len(),
                    loaded.diagnostics.len(),
                    bad_files.len()
                );
            }
        }
    }
    if loaded.diagnostics.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn cmd_test(paths: Vec<PathBuf>, junit: Option<PathBuf>) -> ExitCode {
    let shared = Shared::with_process_env();
    let files = match load::discover_tests(&default_paths(paths)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if files.is_empty() {
        eprintln!("error: no test files found (tests are `<pipeline>.test.yaml` beside each pipeline)");
        return ExitCode::from(1);
    }
    let results: Vec<testing::FileResult> = files.iter().map(|f| testing::run_file(f, &shared)).collect();
    let (mut passed, mut failed, mut broken, mut unloaded) = (0, 0, 0, 0);
    for r in &results {
        match &r.pipeline {
            Some(name) => println!("{} (pipeline {name})", r.file.display()),
            None => println!("{}", r.file.display()),
        }
        if !r.load_errors.is_empty() {
            unloaded += 1;
            eprint!("{}", render(&r.load_errors));
            println!("  BROKEN  the file could not be run: {} problem(s), shown above", r.load_errors.len());
        }
        for c in &r.cases {
            if !c.problems.is_empty() {
                broken += 1;
                eprint!("{}", render(&c.problems));
                println!("  BROKEN  {} ({} problem(s), shown above)", c.name, c.problems.len());
            } else if c.failures.is_empty() {
                passed += 1;
                println!("  ok    {}", c.name);
            } else {
                failed += 1;
                println!("  FAIL  {}", c.name);
                for f in &c.failures {
                    println!("          {f}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed, {broken} could not run; {unloaded} test file(s) could not be loaded");
    if let Some(path) = junit
        && let Err(e) = write_junit(&results, &path)
    {
        eprintln!("error: cannot write {}: {e}", path.display());
        return ExitCode::from(2);
    }
    if failed == 0 && broken == 0 && unloaded == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn write_junit(results: &[testing::FileResult], path: &PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
    let mut report = Report::new("switchyard");
    for r in results {
        let mut suite = TestSuite::new(r.file.display().to_string());
        if !r.load_errors.is_empty() {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
            status.set_message("the test file or its pipeline could not be loaded");
            status.set_description(r.load_errors.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"));
            suite.add_test_case(TestCase::new("load", status));
        }
        for c in &r.cases {
            let status = if !c.problems.is_empty() {
                let mut s = TestCaseStatus::non_success(NonSuccessKind::Error);
                s.set_message("the test case could not run");
                s.set_description(c.problems.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"));
                s
            } else if c.failures.is_empty() {
                TestCaseStatus::success()
            } else {
                let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                s.set_message(c.failures[0].clone());
                s.set_description(c.failures.join("\n"));
                s
            };
            suite.add_test_case(TestCase::new(c.name.clone(), status));
        }
        report.add_test_suite(suite);
    }
    std::fs::write(path, report.to_string()?)?;
    Ok(())
}

fn cmd_run(paths: Vec<PathBuf>, once: bool, data_dir: PathBuf, state: Option<String>, listen: std::net::SocketAddr) -> ExitCode {
    let paths = default_paths(paths);
    let loaded = match load_paths(&paths) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if !loaded.diagnostics.is_empty() {
        eprint!("{}", render(&loaded.diagnostics));
        eprintln!("error: {} problem(s); nothing was run (see `switchyard validate`)", loaded.diagnostics.len());
        return ExitCode::from(1);
    }
    eprint!("{}", render(&loaded.warnings));
    cli::ops::run(
        loaded.pipelines,
        paths,
        cli::ops::RunFlags { once, data_dir, state_store: state.filter(|s| !s.trim().is_empty()), listen },
    )
}

fn main() -> ExitCode {
    // `run --once` and `test` run pipelines on this thread too: it gets their stack. Where the
    // system refuses to reserve it, the command runs here, on the main thread's stack.
    let spawned =
        std::thread::Builder::new().name("switchyard".into()).stack_size(switchyard::runtime::PIPELINE_THREAD_STACK).spawn(command);
    match spawned.map(std::thread::JoinHandle::join) {
        Ok(Ok(code)) => code,
        // A panic's message is on stderr already.
        Ok(Err(_)) => ExitCode::from(101),
        Err(_) => command(),
    }
}

fn command() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    // lapin logs a returned message with its whole payload, and channel errors we report
    // ourselves in words: never payloads in the log.
    let filter = filter
        .add_directive("lapin::returned_messages=off".parse().expect("directive"))
        .add_directive("lapin::channel=off".parse().expect("directive"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
    match cli.command {
        Command::Validate { paths, format } => cmd_validate(paths, format),
        Command::Test { paths, junit } => cmd_test(paths, junit),
        Command::Topology { paths } => cmd_topology(paths),
        Command::Run { paths, once, data_dir, store, listen } => cmd_run(paths, once, data_dir, store, listen),
        Command::Status { format, data_dir } => cli::ops::status(format, data_dir),
        Command::Keys { command, data_dir, store } => cli::ops::keys(command, data_dir, store.filter(|s| !s.trim().is_empty())),
        Command::Send { queue, files, format, data_dir } => cli::ops::send(queue, files, format, data_dir),
        Command::Queues { command: None, format, data_dir } => cli::ops::queues(format, data_dir),
        Command::Queues { command: Some(cli::ops::QueuesCommand::Unsubscribe { queue, pipeline, drop_messages }), data_dir, .. } => {
            cli::ops::unsubscribe(queue, pipeline, drop_messages, data_dir)
        }
        Command::Exceptions { command, data_dir, store } => cli::ops::exceptions(command, data_dir, store.filter(|s| !s.trim().is_empty())),
        Command::Simulate(simulation) => cli::simulate::simulate(simulation),
        Command::Schema { kind } => {
            print!("{}", schema::render(kind));
            ExitCode::SUCCESS
        }
    }
}
