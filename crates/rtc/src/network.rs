//! Analysis of a network of components (implementation of [`crate::system::analyze`]).
use crate::system::*;

pub(crate) fn analyze(sys: &System, _opts: &Options) -> Result<Analysis, AnalysisError> {
    Err(AnalysisError::Resource { resource: sys.resources.first().map(|r| r.name.clone()).unwrap_or_default(), msg: "not implemented yet".into() })
}
