//! Immutable, content-addressed app versions.
//!
//! A bundle is the manifest plus exactly the files it references. Its id is
//! the SHA-256 of a canonical listing (sorted paths, each with its length and
//! the SHA-256 of its content), so the id does not depend on file order, tar
//! headers or timestamps. On the wire and on disk a bundle is a plain tar
//! archive with deterministic headers.

use crate::manifest::{is_safe_relative_path, Manifest, ManifestErrors, RouteTarget};
use meridian_core::VersionId;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "meridian.toml";
/// Refuse bundles larger than this; an app is code and a small site, not a
/// media library.
pub const MAX_BUNDLE_BYTES: u64 = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Manifest(#[from] ManifestErrors),
    #[error("the manifest refers to {0:?}, which is not in the app directory")]
    MissingFile(String),
    #[error("static directory {0:?} is not a directory")]
    NotADirectory(String),
    #[error("{0:?} is a symbolic link pointing outside the app; copy the file in instead")]
    EscapingLink(String),
    #[error("bundle archive is malformed: {0}")]
    Archive(String),
    #[error("bundle is larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
}

#[derive(Clone, Debug)]
pub struct Bundle {
    pub manifest: Manifest,
    /// Every file of the version by relative path, the manifest included.
    pub files: BTreeMap<String, Vec<u8>>,
    /// The SHA-256 of each file (computed once, for the id).
    pub digests: BTreeMap<String, [u8; 32]>,
    pub id: VersionId,
}

impl Bundle {
    /// Reads an app directory: its `meridian.toml` and the files it names.
    pub fn from_dir(dir: &Path) -> Result<Bundle, BundleError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|source| BundleError::Io { path: manifest_path.clone(), source })?;
        let manifest = Manifest::parse(&manifest_path.display().to_string(), &text)?;
        let mut files = BTreeMap::new();
        files.insert(MANIFEST_FILE.to_string(), text.into_bytes());
        let root = dir.canonicalize().map_err(|source| BundleError::Io { path: dir.into(), source })?;
        for c in manifest.components.values() {
            let p = dir.join(&c.source);
            if !p.is_file() {
                return Err(BundleError::MissingFile(c.source.clone()));
            }
            files.insert(c.source.clone(), read(&p)?);
        }
        for r in &manifest.routes {
            if let RouteTarget::Static(sdir) = &r.target {
                let p = dir.join(sdir);
                if !p.is_dir() {
                    return Err(BundleError::NotADirectory(sdir.clone()));
                }
                collect_dir(&root, &p, sdir, &mut files)?;
            }
        }
        Self::assemble(manifest, files)
    }

    /// Reads a bundle from its tar form, checking every entry.
    pub fn from_tar(bytes: &[u8]) -> Result<Bundle, BundleError> {
        if bytes.len() as u64 > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge);
        }
        let bad = |m: String| BundleError::Archive(m);
        let mut archive = tar::Archive::new(bytes);
        let mut files = BTreeMap::new();
        for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(bad("only regular files are allowed".into()));
            }
            let path = entry.path().map_err(|e| bad(e.to_string()))?;
            let path = path.to_str().ok_or_else(|| bad("non UTF-8 path".into()))?.to_string();
            if !is_safe_relative_path(&path) {
                return Err(bad(format!("unsafe path {path:?}")));
            }
            // The header's size is a claim: reserve no more than the bytes
            // the archive has left, and read no more than the claim.
            let size = entry.size();
            let left = bytes.len() as u64 - entry.raw_file_position().min(bytes.len() as u64);
            if size > left {
                return Err(bad(format!("{path:?} claims {size} bytes but the archive has {left} left")));
            }
            let mut data = Vec::with_capacity(size as usize);
            (&mut entry).take(size).read_to_end(&mut data).map_err(|e| bad(e.to_string()))?;
            if data.len() as u64 != size {
                return Err(bad(format!("{path:?} is truncated: {} of {size} bytes", data.len())));
            }
            if files.insert(path.clone(), data).is_some() {
                return Err(bad(format!("{path:?} appears twice")));
            }
        }
        let text = files.get(MANIFEST_FILE).ok_or_else(|| bad(format!("no {MANIFEST_FILE}")))?;
        let text = std::str::from_utf8(text).map_err(|_| bad(format!("{MANIFEST_FILE} is not UTF-8")))?;
        let manifest = Manifest::parse(MANIFEST_FILE, text)?;
        for c in manifest.components.values() {
            if !files.contains_key(&c.source) {
                return Err(BundleError::MissingFile(c.source.clone()));
            }
        }
        Self::assemble(manifest, files)
    }

    fn assemble(manifest: Manifest, files: BTreeMap<String, Vec<u8>>) -> Result<Bundle, BundleError> {
        let total: u64 = files.values().map(|f| f.len() as u64).sum();
        if total > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge);
        }
        let mut h = Sha256::new();
        h.update(b"meridian-bundle-v1\0");
        let mut digests = BTreeMap::new();
        for (path, data) in &files {
            let d: [u8; 32] = Sha256::digest(data).into();
            h.update(path.as_bytes());
            h.update([0]);
            h.update((data.len() as u64).to_le_bytes());
            h.update(d);
            digests.insert(path.clone(), d);
        }
        Ok(Bundle { manifest, files, digests, id: VersionId::from_digest(h.finalize().into()) })
    }

    /// The deterministic tar form: sorted entries, fixed mode, owner and mtime.
    pub fn to_tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in &self.files {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            // Writing into a Vec cannot fail; paths were validated on the way in.
            b.append_data(&mut header, path, data.as_slice()).expect("tar into memory");
        }
        b.into_inner().expect("tar into memory")
    }

    /// Files under a static route's directory, keyed by the path relative to it.
    pub fn static_files<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let prefix = format!("{dir}/");
        self.files.iter().filter_map(move |(p, d)| p.strip_prefix(&prefix).map(|rel| (rel, d.as_slice())))
    }
}

fn read(p: &Path) -> Result<Vec<u8>, BundleError> {
    std::fs::read(p).map_err(|source| BundleError::Io { path: p.into(), source })
}

fn collect_dir(root: &Path, dir: &Path, rel: &str, files: &mut BTreeMap<String, Vec<u8>>) -> Result<(), BundleError> {
    let io = |source| BundleError::Io { path: dir.into(), source };
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io)?.collect::<Result<_, _>>().map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let Some(name) = e.file_name().to_str().map(str::to_string) else { continue };
        if name.starts_with('.') {
            continue;
        }
        let rel_path = format!("{rel}/{name}");
        let path = e.path();
        // A link is followed only if it stays inside the app directory.
        let real = path.canonicalize().map_err(|source| BundleError::Io { path: path.clone(), source })?;
        if !real.starts_with(root) {
            return Err(BundleError::EscapingLink(rel_path));
        }
        if real.is_dir() {
            collect_dir(root, &path, &rel_path, files)?;
        } else if real.is_file() {
            files.insert(rel_path, read(&path)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(dir: &Path, body: &str) {
        std::fs::create_dir_all(dir.join("public/css")).unwrap();
        std::fs::write(dir.join("public/index.html"), body).unwrap();
        std::fs::write(dir.join("public/css/site.css"), "p{}").unwrap();
        std::fs::write(dir.join("f.wasm"), b"\0asm").unwrap();
        std::fs::write(
            dir.join(MANIFEST_FILE),
            "[app]\nname='a'\n[components.f]\nsource='f.wasm'\n[[routes]]\npath='/f'\ncomponent='f'\n[[routes]]\npath='/'\nstatic='public'\n",
        )
        .unwrap();
    }

    #[test]
    fn identical_content_gives_identical_ids_and_round_trips_through_tar() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        app(a.path(), "hi");
        app(b.path(), "hi");
        let ba = Bundle::from_dir(a.path()).unwrap();
        assert_eq!(ba.id, Bundle::from_dir(b.path()).unwrap().id);
        assert_eq!(ba.files.len(), 4);
        let back = Bundle::from_tar(&ba.to_tar()).unwrap();
        assert_eq!(back.id, ba.id);
        let statics: Vec<_> = back.static_files("public").map(|(p, _)| p).collect();
        assert_eq!(statics, vec!["css/site.css", "index.html"]);
    }

    #[test]
    fn any_change_gives_a_new_id() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        app(a.path(), "hi");
        app(b.path(), "ho");
        assert_ne!(Bundle::from_dir(a.path()).unwrap().id, Bundle::from_dir(b.path()).unwrap().id);
    }

    #[test]
    fn hostile_archives_are_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses `..`, so write the raw name like an attacker would.
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let err = Bundle::from_tar(&b.into_inner().unwrap()).unwrap_err();
        assert!(err.to_string().contains("unsafe path"), "{err}");
        assert!(Bundle::from_tar(b"not a tar at all").is_err());
    }

    /// Issue 27, item 3: an entry's header may claim any size; what is
    /// reserved and read is bounded by the bytes that actually came.
    #[test]
    fn an_entry_claiming_more_bytes_than_the_archive_holds_is_refused_without_reserving_them() {
        let mut h = tar::Header::new_gnu();
        h.set_path("meridian.toml").unwrap();
        // 16 TiB: reserving it would abort the process.
        h.set_size(1 << 44);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[b'x'; 1024]);
        let err = Bundle::from_tar(&bytes).unwrap_err();
        assert!(err.to_string().contains("claims"), "{err}");

        // A real bundle cut anywhere is an error, never a shorter version.
        let d = tempfile::tempdir().unwrap();
        app(d.path(), "hello");
        let whole = Bundle::from_dir(d.path()).unwrap();
        let tar = whole.to_tar();
        for cut in (1..tar.len()).step_by(97) {
            // Only the end-of-archive blocks may go: the same version.
            if let Ok(b) = Bundle::from_tar(&tar[..cut]) {
                assert_eq!(b.id, whole.id, "cut at {cut} of {} parsed as another version", tar.len());
            }
        }
    }

    #[test]
    fn missing_component_file_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        app(d.path(), "x");
        std::fs::remove_file(d.path().join("f.wasm")).unwrap();
        assert!(matches!(Bundle::from_dir(d.path()), Err(BundleError::MissingFile(_))));
    }
}
