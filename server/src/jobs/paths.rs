//! Paths in specs: every one must lie inside the configured data roots, after resolving symbolic
//! links, and is stored resolved, so every worker reads the same file whatever its working
//! directory. A path outside the roots is refused before the server looks at the disk, so errors
//! tell nothing about files outside them. Patterns are expanded by walking only below their
//! literal part, which must itself lie inside the roots, within a budget of entries and time.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use glob::{MatchOptions, Pattern};

use crate::error::ApiError;

/// At most this many paths from all the patterns of one request together (after removing repeats).
pub const MAX_MATCHES: usize = 10_000;
/// At most this many directory entries looked at while expanding one request's patterns.
pub const MAX_VISITED: usize = 200_000;
/// At most this long spent expanding one request's patterns.
pub const MAX_EXPANSION: Duration = Duration::from_secs(5);

/// Why a path was not taken.
enum Refusal {
    ParentDir,
    Outside,
    Missing,
}

fn outside(field: &str, path: &str) -> ApiError {
    ApiError::invalid_field(field, format!("{path} is outside the server's data roots"))
}

/// `path` (relative to the server's working directory) resolved inside `roots`.
fn resolve(roots: &[PathBuf], path: &Path) -> Result<PathBuf, Refusal> {
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(Refusal::ParentDir);
    }
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(|_| Refusal::Missing)?.join(path)
    };
    let roots: Vec<PathBuf> = roots.iter().filter_map(|root| root.canonicalize().ok()).collect();
    // Lexically first (roots may be reached through links, so compare with both forms).
    let lexically_inside = |p: &Path| roots.iter().any(|root| p.starts_with(root));
    if !lexically_inside(&absolute) && !lexically_inside(&absolute.canonicalize().unwrap_or_default()) {
        return Err(Refusal::Outside);
    }
    let resolved = absolute.canonicalize().map_err(|_| Refusal::Missing)?;
    if !lexically_inside(&resolved) {
        return Err(Refusal::Outside);
    }
    Ok(resolved)
}

/// `path` (relative to the server's working directory) resolved inside `roots`, or an error
/// naming `field`.
pub fn inside_roots(roots: &[PathBuf], field: &str, path: &str) -> Result<PathBuf, ApiError> {
    resolve(roots, Path::new(path)).map_err(|refusal| match refusal {
        Refusal::ParentDir => ApiError::invalid_field(field, format!("{path}: `..` is not allowed in paths")),
        Refusal::Outside => outside(field, path),
        Refusal::Missing => ApiError::invalid_field(field, format!("{path} does not exist on the server")),
    })
}

/// What one request may still spend on expanding patterns.
pub struct Budget {
    visited: usize,
    deadline: Instant,
}

impl Budget {
    pub fn new() -> Self {
        Budget { visited: 0, deadline: Instant::now() + MAX_EXPANSION }
    }

    fn spend(&mut self, field: &str, pattern: &str) -> Result<(), ApiError> {
        self.visited += 1;
        if self.visited > MAX_VISITED || Instant::now() > self.deadline {
            let message = format!(
                "{pattern} looks at more than {MAX_VISITED} entries or {} s; name a narrower directory",
                MAX_EXPANSION.as_secs()
            );
            return Err(ApiError::too_broad(field, message));
        }
        Ok(())
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

/// The components of `pattern` before its first one with a wildcard, and the components from there on.
fn literal_prefix(pattern: &Path) -> (PathBuf, Vec<String>) {
    let mut prefix = PathBuf::new();
    let mut rest = Vec::new();
    for component in pattern.components() {
        let text = component.as_os_str().to_string_lossy();
        if rest.is_empty() && !text.contains(['*', '?', '[']) {
            prefix.push(component);
        } else {
            rest.push(text.into_owned());
        }
    }
    (prefix, rest)
}

/// A preparation input: a file, a directory or a glob pattern. A pattern's literal part must lie
/// inside the roots; only below it is the disk walked (links to directories are not followed),
/// and every match is checked, so a pattern cannot reach outside the roots. Out of the roots, the
/// message names only the pattern, whatever lies there.
pub fn expand_input(
    roots: &[PathBuf],
    field: &str,
    input: &str,
    budget: &mut Budget,
) -> Result<Vec<PathBuf>, ApiError> {
    if !input.contains(['*', '?', '[']) {
        return Ok(vec![inside_roots(roots, field, input)?]);
    }
    if Path::new(input).components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ApiError::invalid_field(field, format!("{input}: `..` is not allowed in paths")));
    }
    let pattern = Pattern::new(input).map_err(|e| ApiError::invalid_field(field, format!("bad pattern: {e}")))?;
    let (prefix, rest) = literal_prefix(Path::new(input));
    let nothing = || ApiError::invalid_field(field, format!("{input} matches nothing inside the data roots"));
    match resolve(roots, &prefix) {
        Ok(_) => {}
        Err(Refusal::Outside | Refusal::ParentDir) => return Err(outside(field, input)),
        Err(Refusal::Missing) => return Err(nothing()),
    }
    // A pattern relative to the working directory is matched against paths without a leading `./`.
    let start = if prefix.as_os_str().is_empty() { PathBuf::from(".") } else { prefix };
    let depth = if rest.iter().any(|c| c.contains("**")) { usize::MAX } else { rest.len() };
    let options = MatchOptions { require_literal_separator: true, ..MatchOptions::new() };
    let walk = walkdir::WalkDir::new(&start).min_depth(1).max_depth(depth).sort_by_file_name();
    let mut resolved = Vec::new();
    for entry in walk {
        budget.spend(field, input)?;
        let Ok(entry) = entry else { continue };
        let path = entry.path().strip_prefix(".").unwrap_or(entry.path());
        if !pattern.matches_path_with(path, options) {
            continue;
        }
        match resolve(roots, entry.path()) {
            Ok(path) => resolved.push(path),
            Err(_) => return Err(outside(field, input)),
        }
        if resolved.len() > MAX_MATCHES {
            return Err(ApiError::too_broad(field, format!("{input} matches more than {MAX_MATCHES} paths")));
        }
    }
    if resolved.is_empty() {
        return Err(nothing());
    }
    Ok(resolved)
}

/// Every input of a request resolved and expanded (errors name `field[i]`), repeats removed, at
/// most [`MAX_MATCHES`] in all; run it on a blocking thread, as it reads the disk.
pub fn expand_inputs(roots: &[PathBuf], field: &str, inputs: &[String]) -> Result<Vec<String>, ApiError> {
    let (mut budget, mut seen, mut all) = (Budget::new(), BTreeSet::new(), Vec::new());
    for (i, input) in inputs.iter().enumerate() {
        let field = format!("{field}[{i}]");
        for path in expand_input(roots, &field, input, &mut budget)? {
            if seen.insert(path.clone()) {
                all.push(path.display().to_string());
            }
        }
        if all.len() > MAX_MATCHES {
            return Err(ApiError::too_broad(field, format!("the inputs name more than {MAX_MATCHES} paths")));
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_roots_are_refused_alike_whether_or_not_they_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("models")).unwrap();
        std::fs::write(tmp.path().join("secret.txt"), "x").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret.txt"), root.join("link.txt")).unwrap();
        let roots = [root.clone()];
        let message = |path: &Path| inside_roots(&roots, "f", &path.display().to_string()).unwrap_err().message;
        let secret = tmp.path().join("secret.txt");
        let missing = tmp.path().join("missing.txt");
        assert_eq!(
            message(&secret).replace(&secret.display().to_string(), "P"),
            message(&missing).replace(&missing.display().to_string(), "P")
        );
        assert!(message(&root.join("link.txt")).contains("outside"), "a link out of the roots");
        assert!(message(&root.join("models/../../secret.txt")).contains("`..`"));
        assert!(message(&root.join("nothing")).contains("does not exist"));
        assert_eq!(
            inside_roots(&roots, "f", &root.join("models").display().to_string()).unwrap(),
            root.join("models").canonicalize().unwrap()
        );
        let pattern = format!("{}/[m]odels/../../secret.txt", root.display());
        assert!(expand_input(&roots, "inputs[0]", &pattern, &mut Budget::new()).is_err(), "a glob cannot climb out");
        let pattern = format!("{}/*.txt", root.display());
        assert!(
            expand_input(&roots, "inputs[0]", &pattern, &mut Budget::new()).unwrap_err().message.contains("outside"),
            "a matched link is checked"
        );
    }

    #[test]
    fn a_pattern_walks_only_below_its_literal_part_and_within_its_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("texts/deep")).unwrap();
        for name in ["a.txt", "b.txt", "c.json", "deep/d.txt"] {
            std::fs::write(root.join("texts").join(name), "x").unwrap();
        }
        let roots = [root.clone()];
        let texts = root.join("texts").canonicalize().unwrap();
        let expand = |pattern: &str, budget: &mut Budget| expand_input(&roots, "f", pattern, budget);
        let found = expand(&format!("{}/texts/*.txt", root.display()), &mut Budget::new()).unwrap();
        assert_eq!(found, [texts.join("a.txt"), texts.join("b.txt")], "`*` stays in its directory");
        let found = expand(&format!("{}/texts/**/*.txt", root.display()), &mut Budget::new()).unwrap();
        assert_eq!(found.len(), 3, "`**` descends: {found:?}");
        let mut nearly_spent = Budget { visited: MAX_VISITED - 2, deadline: Instant::now() + MAX_EXPANSION };
        let error = expand(&format!("{}/texts/*.txt", root.display()), &mut nearly_spent).unwrap_err();
        assert_eq!((error.code, error.field.as_deref()), ("pattern_too_broad", Some("f")));
        let twice = [format!("{}/texts/*.txt", root.display()), format!("{}/texts/a.txt", root.display())];
        assert_eq!(expand_inputs(&roots, "inputs", &twice).unwrap().len(), 2, "a path named twice is kept once");
    }
}
