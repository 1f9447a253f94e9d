//! `model` — vigil's system description file.
//!
//! Owns: the TOML format that describes processors, links, VMs (CBS reservations), event
//! streams, tasks and chains (see `docs/model-format.md`); units ("10ms", "1500B",
//! "100Mbit/s", parsed exactly); validation with `file:line` messages; the mapping onto
//! [`rtc::system::System`]; hosts and VM deployment ([`Deployment`]: modes, criticality,
//! memory, instances, backups, checkpoint streams) and how a [`Placement`] rewrites the
//! system; and the [`report::Report`] that maps analysis results back onto names for humans
//! and JSON.
//!
//! Does not own: the analysis itself (`rtc`), the search for placements (`planner`), printing or exit codes (the `vigil`
//! binary). Nothing here panics on bad input: every problem is a [`ModelError`].
//!
//! Inside the [`System`] time is in microseconds; the work of a task on a processor or VM is in
//! microseconds of processing time, on a link in bytes.

mod deploy;
mod error;
mod names;
pub mod plot;
mod raw;
pub mod replication;
pub mod report;
pub mod run;
pub mod text;
pub mod units;
mod validate;

pub use deploy::{Checkpoint, Deployment, Host, Message, Mode, Placement, Vm, VmPlace};
pub use error::ModelError;
pub use validate::{MAX_FILE_BYTES, MAX_ITEMS, MAX_TRACE};

use rtc::system::{AnalysisError, System};
use std::path::Path;

/// What kind of item of the file something came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemKind {
    Host,
    Processor,
    Link,
    Vm,
    Stream,
    Task,
    Chain,
}

impl ItemKind {
    pub fn name(&self) -> &'static str {
        match self {
            ItemKind::Host => "host",
            ItemKind::Processor => "processor",
            ItemKind::Link => "link",
            ItemKind::Vm => "vm",
            ItemKind::Stream => "stream",
            ItemKind::Task => "task",
            ItemKind::Chain => "chain",
        }
    }
}

/// Where an element of the [`System`] was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// `Vm` for a reservation, and for the task of a VM that is itself one task.
    pub kind: ItemKind,
    /// 1-based line of the item's `[[...]]` header.
    pub line: usize,
}

/// A validated system description.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub system: System,
    /// File name used in messages.
    pub file: String,
    /// Parallel to `system.resources`, `.streams`, `.tasks`, `.chains`.
    pub resources: Vec<Item>,
    pub streams: Vec<Item>,
    pub tasks: Vec<Item>,
    pub chains: Vec<Item>,
    /// Hosts, VM modes and placements, when the file has `[[host]]` items.
    pub deployment: Option<Deployment>,
    /// How VMs run (`[[run]]` items, for `vigil up`).
    pub runs: Vec<run::Run>,
}

impl Loaded {
    /// Unit of a task's work: `"µs"` (processing time) or `"B"` (bytes, on links).
    pub fn work_unit(&self, task: usize) -> &'static str {
        let r = self.system.tasks.get(task).map(|t| t.resource).unwrap_or(0);
        match self.resources.get(r).map(|i| i.kind) {
            Some(ItemKind::Link) => "B",
            _ => "µs",
        }
    }

    /// An analysis error, pointed at the line of the item it names.
    pub fn locate(&self, e: &AnalysisError) -> ModelError {
        let s = &self.system;
        let (name, msg, found) = match e {
            AnalysisError::Task { task, msg } => (task, msg, s.tasks.iter().position(|t| &t.name == task).map(|i| self.tasks[i])),
            AnalysisError::Resource { resource, msg } => {
                (resource, msg, s.resources.iter().position(|r| &r.name == resource).map(|i| self.resources[i]))
            }
            AnalysisError::Stream { stream, msg } => {
                (stream, msg, s.streams.iter().position(|r| &r.name == stream).map(|i| self.streams[i]))
            }
            AnalysisError::Chain { chain, msg } => (chain, msg, s.chains.iter().position(|r| &r.name == chain).map(|i| self.chains[i])),
        };
        let kind = match (e, found) {
            (_, Some(i)) => i.kind.name(),
            (AnalysisError::Task { .. }, None) => "task",
            (AnalysisError::Resource { .. }, None) => "resource",
            (AnalysisError::Stream { .. }, None) => "stream",
            (AnalysisError::Chain { .. }, None) => "chain",
        };
        ModelError::Analysis {
            file: self.file.clone(),
            line: found.map(|i| i.line).unwrap_or(1),
            kind,
            name: name.clone(),
            msg: msg.clone(),
        }
    }
}

/// Reads and validates a system description; trace files are resolved relative to its folder.
pub fn load(path: impl AsRef<Path>) -> Result<Loaded, ModelError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let io = |source| ModelError::Io { path: shown.clone(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(ModelError::Syntax { file: shown, line: 1, msg: format!("file larger than {MAX_FILE_BYTES} bytes") });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, &shown, base)
}

/// Validates a system description given as text. `file` names it in messages; `base_dir`
/// resolves trace files.
pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Loaded, ModelError> {
    let mut ctx = validate::Ctx::new(file, text);
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ModelError::Syntax { file: file.into(), line: 1, msg: format!("file larger than {MAX_FILE_BYTES} bytes") });
    }
    let raw: raw::RawFile = raw::read(text).map_err(|e| {
        let msg = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        let at = e.span().map(|s| s.start);
        ModelError::Syntax {
            file: file.into(),
            line: at.map(|s| ctx.line_at(s)).unwrap_or(1),
            msg: match at.and_then(|s| enclosing_item(text, s)) {
                Some(item) => format!("{item}: {msg}"),
                None => msg,
            },
        }
    })?;
    ctx.set_items(&raw);
    let mut loaded = validate::build(&raw, &ctx, base_dir)?;
    let vms: Vec<run::VmFacts> = loaded
        .deployment
        .as_ref()
        .map(|d| {
            d.vms.iter().map(|v| run::VmFacts { name: v.name.clone(), memory: v.memory.to_f64(), instances: v.instances.len() }).collect()
        })
        .unwrap_or_default();
    loaded.runs = run::build(&raw.run, &ctx, &vms)?;
    Ok(loaded)
}

/// `kind "name"` of the `[[kind]]` item that contains byte `at`, for messages about TOML
/// that could not be read into items.
fn enclosing_item(text: &str, at: usize) -> Option<String> {
    let at = (0..=at.min(text.len())).rev().find(|&i| text.is_char_boundary(i))?;
    let start = if text[at..].starts_with("[[") { Some(at) } else { text[..at].rfind("\n[[").map(|i| i + 1) };
    let start = start.or_else(|| text.starts_with("[[").then_some(0))?;
    let rest = &text[start..];
    let kind = rest.get(2..)?.split("]]").next()?.trim();
    if kind.is_empty() || kind.len() > 20 || !kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let body = rest.split_once('\n').map(|(_, b)| b).unwrap_or("");
    let body = &body[..body.find("\n[").map(|i| i + 1).unwrap_or(body.len())];
    let name = body.lines().find_map(|l| {
        let v = l.trim().strip_prefix("name")?.trim_start().strip_prefix('=')?.trim();
        let v = v.strip_prefix('"')?;
        Some(v[..v.find('"')?].to_string())
    });
    Some(match name {
        Some(n) => format!("{kind} {n:?}"),
        None => kind.to_string(),
    })
}

#[cfg(test)]
mod tests;
