//! The one error type of this crate. Every message starts with `file:line:` (where there is a
//! line) and names the offending item, so it can be printed as one line.

/// Why a system description could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or a key or type the format does not have.
    #[error("{file}:{line}: {msg}")]
    Syntax { file: String, line: usize, msg: String },
    /// An item is wrong on its own or in relation to others.
    #[error("{file}:{line}: {kind} {name:?}: {msg}")]
    Invalid { file: String, line: usize, kind: &'static str, name: String, msg: String },
    /// A resource would be overloaded in the long run (no finite bound can exist).
    #[error("{file}:{line}: {kind} {name:?}: overloaded: long-run utilisation is {percent}% (more than 100%){detail}")]
    Overload { file: String, line: usize, kind: &'static str, name: String, percent: String, detail: String },
    /// The analysis refused the system (mapped back to the item's line).
    #[error("{file}:{line}: {kind} {name:?}: cannot be analysed: {msg}")]
    Analysis { file: String, line: usize, kind: &'static str, name: String, msg: String },
}

impl ModelError {
    /// Line in the file the error points at, when it has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ModelError::Io { .. } => None,
            ModelError::Syntax { line, .. }
            | ModelError::Invalid { line, .. }
            | ModelError::Overload { line, .. }
            | ModelError::Analysis { line, .. } => Some(*line),
        }
    }
}
