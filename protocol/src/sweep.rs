//! Sweeps: a base job spec and a grid of values for some of its fields; every combination of the
//! grid's values is one training job (`POST /v1/sweeps`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::spec::limits::NAME_BYTES;
use crate::spec::{check_name, FieldError};

/// At most this many jobs in one sweep: a sweep is a comparison to read, not a search.
pub const MAX_JOBS: usize = 64;

/// At most this many fields varied by one grid, each path at most this long.
pub const MAX_PATHS: usize = 32;
const MAX_PATH_BYTES: usize = 256;

/// Fields a grid cannot vary: every job is named after its sweep and point, and a sweep starts
/// fresh jobs (a continuation has its own endpoint).
const FIXED: [&str; 2] = ["name", "continue_from"];

/// What `POST /v1/sweeps` takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepRequest {
    pub name: String,
    /// A job spec as `POST /v1/jobs` takes it (its `name` is replaced by each job's).
    pub base: Map<String, Value>,
    /// Field path → the values it takes. A path is a top-level field (`lr`) or goes into one with
    /// dots, numbers indexing lists (`train_data.1.weight`).
    pub grid: BTreeMap<String, Vec<Value>>,
}

/// One job of a sweep: the grid's values at this point, and the spec they make.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    pub values: Map<String, Value>,
    pub name: String,
    pub spec: Value,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into() }
}

impl SweepRequest {
    /// Every point of the grid, the last path varying fastest. The specs are not validated as
    /// jobs here (the server does that, with paths resolved); the grid itself is.
    pub fn expand(&self) -> Result<Vec<SweepPoint>, FieldError> {
        self.check()?;
        let axes: Vec<(&String, &Vec<Value>)> = self.grid.iter().collect();
        let count = axes.iter().map(|(_, values)| values.len()).product::<usize>();
        let mut points = Vec::with_capacity(count);
        for index in 0..count {
            let (mut rest, mut values, mut spec) = (index, Map::new(), Value::Object(self.base.clone()));
            let mut labels = Vec::new();
            for (path, axis) in axes.iter().rev() {
                let at = rest % axis.len();
                rest /= axis.len();
                set(&mut spec, path, axis[at].clone()).map_err(|message| problem(format!("grid.{path}"), message))?;
                values.insert((*path).clone(), axis[at].clone());
                labels.push(format!("{path}={}", label(&axis[at], at)));
            }
            labels.reverse();
            let name = truncate(format!("{} [{}]", self.name, labels.join(", ")));
            spec["name"] = Value::String(name.clone());
            points.push(SweepPoint { values, name, spec });
        }
        Ok(points)
    }

    /// Checks the grid in time linear in its size: the counts first, so that a huge grid is refused
    /// before any of its values is looked at.
    fn check(&self) -> Result<(), FieldError> {
        check_name("name", &self.name)?;
        if self.grid.is_empty() {
            return Err(problem("grid", "must vary at least one field"));
        }
        if self.grid.len() > MAX_PATHS {
            return Err(problem(
                "grid",
                format!("varies {} fields; a sweep varies at most {MAX_PATHS}", self.grid.len()),
            ));
        }
        let count = self.grid.values().fold(1usize, |count, values| count.saturating_mul(values.len()));
        if count > MAX_JOBS {
            return Err(problem("grid", format!("makes {count} jobs; a sweep has at most {MAX_JOBS}")));
        }
        for (path, values) in &self.grid {
            let field = format!("grid.{path}");
            let segments: Vec<&str> = path.split('.').collect();
            if path.len() > MAX_PATH_BYTES || segments.iter().any(|s| s.is_empty()) {
                return Err(problem(field, "a path is field names and list indexes joined by dots"));
            }
            if FIXED.contains(&segments[0]) {
                return Err(problem(field, format!("a sweep cannot vary `{}`", segments[0])));
            }
            if values.is_empty() {
                return Err(problem(field, "must list at least one value"));
            }
            let mut seen = std::collections::HashSet::with_capacity(values.len());
            if let Some(i) = values.iter().position(|value| !seen.insert(value.to_string())) {
                return Err(problem(format!("{field}[{i}]"), "repeats an earlier value"));
            }
            let dots = path.match_indices('.').map(|(at, _)| &path[..at]);
            if let Some(other) = dots.into_iter().find(|outer| self.grid.contains_key(*outer)) {
                return Err(problem(field, format!("lies inside `{other}`, which the grid also varies")));
            }
        }
        Ok(())
    }
}

/// Sets the value at a dotted `path` inside `spec`: lists and objects on the way must exist (an
/// index past a list's end is refused), the last field of an object may be new.
fn set(spec: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let segments: Vec<&str> = path.split('.').collect();
    let mut here = spec;
    for (depth, segment) in segments.iter().enumerate() {
        let last = depth + 1 == segments.len();
        let walked = segments[..=depth].join(".");
        here = match here {
            Value::Object(fields) if last => {
                fields.insert((*segment).to_string(), value);
                return Ok(());
            }
            Value::Object(fields) => {
                fields.get_mut(*segment).ok_or_else(|| format!("the base spec has no `{walked}`"))?
            }
            Value::Array(items) => {
                // One spelling per index (`1`, never `01` or `+1`), so two paths never name one field.
                let canonical =
                    segment.bytes().all(|b| b.is_ascii_digit()) && (segment.len() == 1 || !segment.starts_with('0'));
                let index: usize = segment
                    .parse()
                    .ok()
                    .filter(|_| canonical)
                    .ok_or_else(|| format!("`{walked}`: a list is indexed by a number without leading zeros"))?;
                let len = items.len();
                let item = items.get_mut(index).ok_or_else(|| format!("`{walked}`: the list has {len} items"))?;
                if last {
                    *item = value;
                    return Ok(());
                }
                item
            }
            _ => return Err(format!("`{}` is neither an object nor a list", segments[..depth].join("."))),
        };
    }
    Ok(())
}

/// How a value reads in a job's name: scalars as they are, a list or object by its place in the
/// axis (`#2`), since a whole `train_data` list would not fit.
fn label(value: &Value, at: usize) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Array(_) | Value::Object(_) => format!("#{}", at + 1),
        other => other.to_string(),
    }
}

fn truncate(mut name: String) -> String {
    while name.len() as u64 > NAME_BYTES {
        name.pop();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(grid: Value) -> SweepRequest {
        serde_json::from_value(json!({
            "name": "lr sweep",
            "base": {"name": "x", "lr": 1e-4, "train_data": [{"dataset": "a"}, {"dataset": "b", "weight": 0.1}]},
            "grid": grid,
        }))
        .unwrap()
    }

    #[test]
    fn every_combination_is_a_job_the_last_path_fastest() {
        let points = request(json!({"lr": [1e-4, 1e-3], "train_data.1.weight": [0.05, 0.25, 0.5]})).expand().unwrap();
        assert_eq!(points.len(), 6);
        let pairs: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.spec["lr"].as_f64().unwrap(), p.spec["train_data"][1]["weight"].as_f64().unwrap()))
            .collect();
        assert_eq!(pairs, [(1e-4, 0.05), (1e-4, 0.25), (1e-4, 0.5), (1e-3, 0.05), (1e-3, 0.25), (1e-3, 0.5)]);
        assert_eq!(points[4].name, "lr sweep [lr=0.001, train_data.1.weight=0.25]");
        assert_eq!(points[4].spec["name"], points[4].name.as_str());
        assert_eq!(points[4].values, json!({"lr": 1e-3, "train_data.1.weight": 0.25}).as_object().unwrap().clone());
        assert_eq!(points[4].spec["train_data"][0], json!({"dataset": "a"}), "the rest of the base is kept");
    }

    #[test]
    fn whole_values_and_new_fields_can_be_swept_and_read_by_place() {
        let lists = json!([[{"dataset": "a"}], [{"dataset": "a"}, {"dataset": "b", "weight": 0.25}]]);
        let points = request(json!({"train_data": lists, "warmup_steps": [0, 10]})).expand().unwrap();
        assert_eq!(points.len(), 4);
        assert_eq!(points[3].name, "lr sweep [train_data=#2, warmup_steps=10]");
        assert_eq!(points[3].spec["warmup_steps"], 10);
        assert_eq!(points[0].spec["train_data"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_bad_grid_is_refused_naming_the_path() {
        let field = |grid: Value| request(grid).expand().unwrap_err().field;
        assert_eq!(field(json!({})), "grid");
        assert_eq!(field(json!({"lr": []})), "grid.lr");
        assert_eq!(field(json!({"lr": [1, 2, 1]})), "grid.lr[2]");
        assert_eq!(field(json!({"name": ["a", "b"]})), "grid.name");
        assert_eq!(field(json!({"continue_from.checkpoint": ["a"]})), "grid.continue_from.checkpoint");
        assert_eq!(field(json!({"train_data.5.weight": [0.1]})), "grid.train_data.5.weight");
        assert_eq!(field(json!({"train_data.one.weight": [0.1]})), "grid.train_data.one.weight");
        assert_eq!(field(json!({"lr.x": [0.1]})), "grid.lr.x");
        assert_eq!(field(json!({"missing.x": [0.1]})), "grid.missing.x");
        assert_eq!(field(json!({"a..b": [0.1]})), "grid.a..b");
        assert_eq!(field(json!({"train_data": [[]], "train_data.1.weight": [0.1]})), "grid.train_data.1.weight");
        let big: Vec<u64> = (0..9).collect();
        assert_eq!(field(json!({"seed": big, "lr": big})), "grid");
        assert_eq!(field(json!({"train_data.01.weight": [0.1]})), "grid.train_data.01.weight");
        assert_eq!(field(json!({"train_data.+1.weight": [0.1]})), "grid.train_data.+1.weight");
        assert_eq!(field(json!({"train_data": [[]], "train_data.1.x.y": [0.1]})), "grid.train_data.1.x.y");
    }

    #[test]
    fn a_huge_grid_is_refused_by_its_counts_before_its_values_are_compared() {
        // 25,000 paths of one value each (~360 KB): quadratic checks took ~24 s of CPU, then made a job.
        let grid: BTreeMap<String, Vec<Value>> = (0..25_000).map(|i| (format!("p{i}"), vec![json!(0)])).collect();
        assert_eq!(request(serde_json::to_value(grid).unwrap()).expand().unwrap_err().field, "grid");
        let values: Vec<Value> = (0..100_000).map(|i| json!(i)).collect();
        assert_eq!(request(json!({"lr": values})).expand().unwrap_err().field, "grid");
        let values: Vec<Value> = (0..64).map(|i| json!({"v": i})).collect();
        assert_eq!(request(json!({"warmup_steps": values})).expand().unwrap().len(), 64);
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary() {
        let mut sweep = request(json!({"lr": [1e-4]}));
        sweep.name = "语".repeat(66);
        let name = &sweep.expand().unwrap()[0].name;
        assert!(name.len() as u64 <= NAME_BYTES && name.starts_with('语'));
    }
}
