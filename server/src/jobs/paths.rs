//! Paths in specs: every one must lie inside the configured data roots, after resolving symbolic
//! links, and is stored resolved, so every worker reads the same file whatever its working
//! directory. A path outside the roots is refused before the server looks at the disk, so errors
//! tell nothing about files outside them.

use std::path::{Component, Path, PathBuf};

use crate::error::ApiError;

fn outside(field: &str, path: &str) -> ApiError {
    ApiError::invalid_field(field, format!("{path} is outside the server's data roots"))
}

/// `path` (relative to the server's working directory) resolved inside `roots`, or an error
/// naming `field`.
pub fn inside_roots(roots: &[PathBuf], field: &str, path: &str) -> Result<PathBuf, ApiError> {
    let given = Path::new(path);
    if given.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ApiError::invalid_field(field, format!("{path}: `..` is not allowed in paths")));
    }
    let absolute = if given.is_absolute() {
        given.to_path_buf()
    } else {
        std::env::current_dir().map_err(ApiError::internal)?.join(given)
    };
    let roots: Vec<PathBuf> = roots.iter().filter_map(|root| root.canonicalize().ok()).collect();
    // Lexically first (roots may be reached through links, so compare with both forms).
    let lexically_inside = |p: &Path| roots.iter().any(|root| p.starts_with(root));
    if !lexically_inside(&absolute) && !lexically_inside(&absolute.canonicalize().unwrap_or_default()) {
        return Err(outside(field, path));
    }
    let resolved = absolute
        .canonicalize()
        .map_err(|_| ApiError::invalid_field(field, format!("{path} does not exist on the server")))?;
    if !lexically_inside(&resolved) {
        return Err(outside(field, path));
    }
    Ok(resolved)
}

/// A preparation input: a file, a directory or a glob pattern, expanded here and every match
/// checked, so a pattern cannot reach outside the roots (`<root>/[m]odels/../..`).
pub fn expand_input(roots: &[PathBuf], field: &str, input: &str) -> Result<Vec<PathBuf>, ApiError> {
    if !input.contains(['*', '?', '[']) {
        return Ok(vec![inside_roots(roots, field, input)?]);
    }
    if Path::new(input).components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ApiError::invalid_field(field, format!("{input}: `..` is not allowed in paths")));
    }
    let matches = glob::glob(input).map_err(|e| ApiError::invalid_field(field, format!("bad pattern: {e}")))?;
    let mut resolved = Vec::new();
    for found in matches {
        let found = found.map_err(|_| ApiError::invalid_field(field, format!("{input} cannot be expanded")))?;
        resolved.push(inside_roots(roots, field, &found.to_string_lossy())?);
        if resolved.len() > 10_000 {
            return Err(ApiError::invalid_field(field, "the pattern matches more than 10000 paths"));
        }
    }
    if resolved.is_empty() {
        return Err(ApiError::invalid_field(field, format!("{input} matches nothing inside the data roots")));
    }
    Ok(resolved)
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
        assert!(expand_input(&roots, "inputs[0]", &pattern).is_err(), "a glob cannot climb out");
        let pattern = format!("{}/*.txt", root.display());
        assert!(
            expand_input(&roots, "inputs[0]", &pattern).unwrap_err().message.contains("outside"),
            "a matched link is checked"
        );
    }
}
