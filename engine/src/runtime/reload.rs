//! Loading pipelines again while they run. A running engine watches every file its pipelines
//! were built from (pipeline files, field maps, scripts, lookup tables, schemas); when one
//! changes, it loads them all again and puts the new versions to work from their next batch. A
//! replayed message is processed by the pipeline as its files are at that moment: a fix made
//! just before `switchyard exceptions replay` is never missed.

use super::PipelineRun;
use crate::pipeline::Pipeline;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    let mut files = crate::config::diag::files_read();
    files.extend(paths.iter().filter(|p| p.is_file()).cloned());
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(&f).ok();
            let (len, modified) = (m.as_ref().map_or(0, |m| m.len()), m.and_then(|m| m.modified().ok()));
            (f, len, modified)
        })
        .collect()
}

/// Watches the files and reloads; `say` tells people what happened.
pub struct Reloader {
    paths: Vec<PathBuf>,
    known: tokio::sync::Mutex<Fingerprint>,
    say: Box<dyn Fn(String) + Send + Sync>,
}

impl Reloader {
    /// `paths`: what the pipelines were loaded from (files or folders), to load them again.
    pub fn new(paths: Vec<PathBuf>, say: impl Fn(String) + Send + Sync + 'static) -> Reloader {
        Reloader { known: tokio::sync::Mutex::new(fingerprint(&paths)), paths, say: Box::new(say) }
    }

    /// Loads the pipelines again if a file changed since the last look.
    pub(crate) async fn refresh(&self, runs: &[Arc<PipelineRun>]) {
        let mut known = self.known.lock().await;
        let paths = self.paths.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&paths)).await else { return };
        if now == *known {
            return;
        }
        *known = now;
        let paths = self.paths.clone();
        let loaded =
            tokio::task::spawn_blocking(move || crate::pipeline::load::load_all(&paths, &crate::build::Shared::with_process_env())).await;
        match loaded {
            Ok(Ok(l)) if l.diagnostics.is_empty() => {
                for line in apply(runs, l.pipelines) {
                    (self.say)(format!("reloaded {line}"));
                }
            }
            Ok(Ok(l)) => {
                let mut text = format!("a changed file has {} problem(s); the running pipelines stay as they were:", l.diagnostics.len());
                for d in &l.diagnostics {
                    text.push_str(&format!("\n  {d}"));
                }
                (self.say)(text);
            }
            Ok(Err(e)) => (self.say)(format!("cannot load the pipelines again ({e}); they stay as they were")),
            Err(e) => (self.say)(format!("cannot load the pipelines again ({e}); they stay as they were")),
        }
    }
}

/// Puts newly loaded versions to work, each from its next batch on. A pipeline whose source,
/// sinks or runtime settings changed needs a restart; so does a new one.
fn apply(runs: &[Arc<PipelineRun>], pipelines: Vec<Pipeline>) -> Vec<String> {
    let mut said = Vec::new();
    let mut fresh: std::collections::HashMap<String, Pipeline> = pipelines.into_iter().map(|p| (p.name.clone(), p)).collect();
    for run in runs {
        let old = run.current();
        let Some(new) = fresh.remove(&run.pipeline.name) else {
            said.push(format!("{}: its file is gone; it keeps running until the engine restarts", run.pipeline.name));
            continue;
        };
        if wiring(&new) != wiring(&run.pipeline) {
            said.push(format!("{}: its source, sinks or runtime settings changed; restart the engine to apply them", new.name));
            continue;
        }
        let changes: Vec<String> = new
            .mapping_versions
            .iter()
            .filter(|(k, v)| old.mapping_versions.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if new.version != old.version || !changes.is_empty() {
            let what = if changes.is_empty() { String::new() } else { format!(" ({})", changes.join(", ")) };
            said.push(format!("{}: now running version {}{what}", new.name, new.version));
        }
        run.set_current(Arc::new(new));
    }
    for name in fresh.keys() {
        said.push(format!("{name}: a new pipeline; restart the engine to run it"));
    }
    said
}

/// What a reload cannot change under a running engine: where a pipeline reads and writes, and
/// how it is run.
fn wiring(p: &Pipeline) -> String {
    use crate::registry::{SinkConfig, SourceConfig};
    let source = match &p.source {
        SourceConfig::Queue(q) => format!("queue {}", q.queue.value),
        SourceConfig::File(f) => format!("file {} {:?} {:?}", p.dir.join(&f.path.value).display(), f.format, f.pattern),
        SourceConfig::Stdin(s) => format!("stdin {:?}", s.format),
        SourceConfig::Amqp(a) => format!("amqp {}", a.queue.value),
        // Its path is where the server routes; its auth and limits may change on reload.
        SourceConfig::Http(h) => format!("http {}", h.path.value.trim()),
        // The poller keeps the plan it started with: any change needs a restart.
        SourceConfig::HttpPoll(h) => format!("http_poll {h:?}"),
    };
    let sinks: Vec<String> = p
        .sinks
        .iter()
        .map(|(name, s)| match s {
            SinkConfig::Queue(q) => format!("{name}=queue {} {:?} {:?}", q.queue.value, q.format, q.max_depth),
            SinkConfig::File(f) => format!("{name}=file {} {:?}", f.path.value, f.format),
            SinkConfig::Stdout(o) => format!("{name}=stdout {:?}", o.format),
            SinkConfig::Amqp(_) => format!("{name}=amqp {:?}", s.delivery_config()),
            SinkConfig::Http(h) => format!("{name}=http {}", h.wiring()),
        })
        .collect();
    // Compared only, never shown: the URL may hold a password.
    let broker = p.broker.as_ref().map(|b| {
        let targets: Vec<String> = b.targets.iter().map(|(n, t)| format!("{n}={}", t.describe())).collect();
        format!("{} {:?} {:?} {:?} {targets:?}", b.url, b.heartbeat, b.topology.lines(), b.source)
    });
    format!("{source} | {} | {:?} | {broker:?}", sinks.join(", "), p.runtime)
}
