//! Input files as a stream of documents: `.txt` and `.jsonl`, optionally gzip-compressed, from
//! files, directories (recursively) and glob patterns. Memory holds one document at a time.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flate2::read::MultiGzDecoder;

/// The text formats understood, after an optional `.gz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Txt,
    Jsonl,
}

fn format_of(path: &Path) -> Option<(Format, bool)> {
    let name = path.file_name()?.to_str()?;
    let (name, gz) = match name.strip_suffix(".gz") {
        Some(inner) => (inner, true),
        None => (name, false),
    };
    if name.ends_with(".txt") {
        Some((Format::Txt, gz))
    } else if name.ends_with(".jsonl") {
        Some((Format::Jsonl, gz))
    } else {
        None
    }
}

/// Expands inputs into readable files, sorted: plain paths, directories (recursively, not following
/// symbolic links; only files of known formats are taken from them) and glob patterns (`*`, `?`, `[..]`).
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let text = input.to_string_lossy();
        let expanded: Vec<PathBuf> = if !input.exists() && text.contains(['*', '?', '[']) {
            let matches: Vec<PathBuf> = glob::glob(&text)
                .with_context(|| format!("bad glob pattern {text}"))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("expanding {text}"))?;
            if matches.is_empty() {
                bail!("{text}: the pattern matches no file");
            }
            matches
        } else {
            vec![input.clone()]
        };
        for path in expanded {
            let metadata = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
            if metadata.is_dir() {
                let mut stack = vec![path];
                while let Some(dir) = stack.pop() {
                    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
                        let entry = entry?;
                        // Links inside a directory are not followed: a loop would never end, and a
                        // link could lead out of the directories the server allowed.
                        let kind = entry.file_type()?;
                        if kind.is_dir() {
                            stack.push(entry.path());
                        } else if kind.is_file() && format_of(&entry.path()).is_some() {
                            files.push(entry.path());
                        }
                    }
                }
            } else if format_of(&path).is_some() {
                files.push(path);
            } else {
                bail!("{}: only .txt, .jsonl and their .gz are read", path.display());
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// How files become documents.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// `.txt`: one document per blank-line-separated block (true) or per file (false).
    pub txt_split_on_blank_lines: bool,
    /// `.jsonl`: the field holding the text.
    pub jsonl_text_field: String,
}

/// One item of a file: a document, or a record that could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Document { text: String, origin: String },
    Bad { origin: String, reason: String },
}

/// The documents of one file, streamed.
pub struct DocumentReader {
    lines: std::io::Split<BufReader<Box<dyn Read + Send>>>,
    format: Format,
    options: ReadOptions,
    path: String,
    line: usize,
    /// Bytes of input read so far (uncompressed).
    pub bytes_read: u64,
    current: String,
    current_start: usize,
    done: bool,
}

impl DocumentReader {
    pub fn open(path: &Path, options: &ReadOptions) -> Result<Self> {
        let (format, gz) = format_of(path).with_context(|| format!("{}: unknown format", path.display()))?;
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let raw: Box<dyn Read + Send> = if gz { Box::new(MultiGzDecoder::new(file)) } else { Box::new(file) };
        Ok(Self {
            lines: BufReader::with_capacity(1 << 20, raw).split(b'\n'),
            format,
            options: options.clone(),
            path: path.display().to_string(),
            line: 0,
            bytes_read: 0,
            current: String::new(),
            current_start: 1,
            done: false,
        })
    }

    fn origin(&self, line: usize) -> String {
        format!("{}:{line}", self.path)
    }

    fn take_current(&mut self) -> Option<Item> {
        if self.current.trim().is_empty() {
            self.current.clear();
            return None;
        }
        let text = std::mem::take(&mut self.current);
        Some(Item::Document { text, origin: self.origin(self.current_start) })
    }
}

impl Iterator for DocumentReader {
    type Item = Result<Item>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let Some(bytes) = self.lines.next() else {
                self.done = true;
                return self.take_current().map(Ok);
            };
            let bytes = match bytes {
                Ok(bytes) => bytes,
                Err(e) => return Some(Err(anyhow::Error::new(e).context(format!("reading {}", self.path)))),
            };
            self.line += 1;
            self.bytes_read += bytes.len() as u64 + 1;
            let line = match String::from_utf8(bytes) {
                Ok(line) => line,
                Err(_) => {
                    return Some(Ok(Item::Bad { origin: self.origin(self.line), reason: "invalid UTF-8".into() }))
                }
            };
            let line = line.strip_suffix('\r').unwrap_or(&line);
            match self.format {
                Format::Jsonl => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let origin = self.origin(self.line);
                    let field = &self.options.jsonl_text_field;
                    return Some(Ok(match serde_json::from_str::<serde_json::Value>(line) {
                        Ok(value) => match value.get(field).and_then(|t| t.as_str()) {
                            Some(text) => Item::Document { text: text.to_string(), origin },
                            None => Item::Bad { origin, reason: format!("no string field `{field}`") },
                        },
                        Err(e) => Item::Bad { origin, reason: format!("invalid JSON: {e}") },
                    }));
                }
                Format::Txt if self.options.txt_split_on_blank_lines && line.trim().is_empty() => {
                    let item = self.take_current();
                    self.current_start = self.line + 1;
                    if item.is_some() {
                        return item.map(Ok);
                    }
                }
                Format::Txt => {
                    if !self.current.is_empty() {
                        self.current.push('\n');
                    }
                    self.current.push_str(line);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_walks_do_not_follow_links_so_a_loop_ends_and_nothing_outside_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        let corpus = tmp.path().join("corpus");
        std::fs::create_dir_all(corpus.join("sub")).unwrap();
        std::fs::write(corpus.join("sub/a.txt"), "a").unwrap();
        std::fs::write(tmp.path().join("outside.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(&corpus, corpus.join("sub/loop")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside.txt"), corpus.join("link.txt")).unwrap();
        let files = input_files(std::slice::from_ref(&corpus)).unwrap();
        assert_eq!(files, vec![corpus.join("sub/a.txt")]);
    }
}
