//! The app pipeline's first two steps: `meridian.toml` → [`Manifest`]
//! (strict, every problem reported at once with file, line and key) and an app
//! directory → [`Bundle`] (the immutable, content-addressed version that the
//! control plane stores and regions install).

mod bundle;
mod manifest;

pub use bundle::{Bundle, BundleError, MANIFEST_FILE};
pub use manifest::{
    Component, KvMode, Limits, Manifest, ManifestError, ManifestErrors, Namespace, RollbackScope, Rollout, Route,
    RouteTarget, SmokeTest, TrafficLimits,
};
