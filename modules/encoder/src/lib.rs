//! `encoder` pipeline stage: turns records into f32 tensors for an inference stage.
//!
//! Input: `json` frames (an object, an array of objects, or several objects one after the
//! other) or `bytes` frames holding CSV text or the same JSON. Each record becomes one row
//! of the configured fields, optionally standardised (`(x - mean) / std`). Output: one f32
//! tensor `[rows, fields]` per frame, or, with `shape`, fixed-size windows of rows
//! collected across frames (e.g. `[1, 32, 3]`: 32 time steps of 3 features) emitted every
//! `hop` rows. Errors name the record or line and the missing field or column.

use edge_guest::{Frame, Payload, Tensor, config, payload_kind};
use serde::Deserialize;
use std::collections::VecDeque;

/// Stage configuration (JSON object text, see `modules/README.md`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Input format: `auto` (json payloads as JSON; bytes as JSON if they start with `{` or
    /// `[`, else CSV), `json` or `csv`.
    #[serde(default)]
    format: Format,
    /// JSON: dotted paths of the fields, in tensor order. CSV: header names (needs `header`).
    #[serde(default)]
    fields: Vec<String>,
    /// CSV: 0-based column indices, in tensor order.
    #[serde(default)]
    columns: Vec<u32>,
    /// CSV: the first line of every payload is a header naming the columns.
    #[serde(default)]
    header: bool,
    /// CSV: field separator, one character.
    #[serde(default = "default_delimiter")]
    delimiter: String,
    /// Standardisation per field, in field order.
    #[serde(default)]
    scale: Option<Scale>,
    /// Output tensor shape; its element count must be a multiple of the number of fields.
    /// Absent: one `[rows, fields]` tensor per input frame.
    #[serde(default)]
    shape: Option<Vec<u32>>,
    /// With `shape`: rows between the starts of consecutive windows (1..=window rows);
    /// default: the window's rows (no overlap).
    #[serde(default)]
    hop: Option<u32>,
    /// Stream name for output frames; default: the input frame's stream.
    #[serde(default)]
    stream: Option<String>,
    /// Most rows accepted in one input frame (and in one window).
    #[serde(default = "default_max_rows")]
    max_rows: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scale {
    mean: Vec<f32>,
    std: Vec<f32>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Format {
    #[default]
    Auto,
    Json,
    Csv,
}

fn default_delimiter() -> String {
    ",".into()
}

fn default_max_rows() -> u32 {
    4096
}

const MAX_ROWS_LIMIT: u32 = 1 << 20;

/// How fields are located in a record.
#[derive(Debug, Clone)]
enum Selector {
    /// JSON paths, or CSV header names.
    Names(Vec<String>),
    /// CSV column indices.
    Columns(Vec<usize>),
}

/// Windowing across frames, when `shape` is set.
#[derive(Debug)]
struct Windowing {
    shape: Vec<u32>,
    rows: usize,
    hop: usize,
    /// Buffered rows, flattened.
    buf: VecDeque<f32>,
}

/// The configured encoder: the stage's whole state.
#[derive(Debug)]
pub struct Stage {
    format: Format,
    selector: Selector,
    header: bool,
    delimiter: char,
    /// Per-field `(mean, 1/std)`.
    scale: Option<Vec<(f32, f32)>>,
    window: Option<Windowing>,
    stream: Option<String>,
    max_rows: usize,
}

impl Stage {
    /// Parses and validates the stage config.
    pub fn from_config(text: &str) -> Result<Self, String> {
        let c: Config = config::parse(text)?;
        let selector = match (c.fields.is_empty(), c.columns.is_empty()) {
            (false, true) => Selector::Names(c.fields),
            (true, false) => Selector::Columns(c.columns.iter().map(|&i| i as usize).collect()),
            (true, true) => {
                return Err(config::invalid(
                    "fields",
                    "set `fields` (json paths or csv header names) or `columns` (csv indices)",
                ));
            }
            (false, false) => {
                return Err(config::invalid(
                    "columns",
                    "set either `fields` or `columns`, not both",
                ));
            }
        };
        let n = match &selector {
            Selector::Names(v) => v.len(),
            Selector::Columns(v) => v.len(),
        };
        if let Selector::Names(names) = &selector {
            if let Some(i) = names.iter().position(String::is_empty) {
                return Err(config::invalid(
                    &format!("fields[{i}]"),
                    "must not be empty",
                ));
            }
            if c.format == Format::Csv && !c.header {
                return Err(config::invalid(
                    "fields",
                    "csv fields by name need `header = true`; use `columns` for indices",
                ));
            }
        }
        if matches!(selector, Selector::Columns(_)) && c.format == Format::Json {
            return Err(config::invalid(
                "columns",
                "apply to csv input; use `fields` for json",
            ));
        }
        let mut chars = c.delimiter.chars();
        let delimiter = match (chars.next(), chars.next()) {
            (Some(d), None) if d != '"' && d != '\n' && d != '\r' => d,
            _ => {
                return Err(config::invalid(
                    "delimiter",
                    format!(
                        "must be one character other than a quote or newline, got {:?}",
                        c.delimiter
                    ),
                ));
            }
        };
        if !(1..=MAX_ROWS_LIMIT).contains(&c.max_rows) {
            return Err(config::invalid(
                "max_rows",
                format!("must be between 1 and {MAX_ROWS_LIMIT}, got {}", c.max_rows),
            ));
        }
        let scale = match c.scale {
            None => None,
            Some(s) => {
                if s.mean.len() != n {
                    return Err(config::invalid(
                        "scale.mean",
                        format!("has {} values for {n} fields", s.mean.len()),
                    ));
                }
                if s.std.len() != n {
                    return Err(config::invalid(
                        "scale.std",
                        format!("has {} values for {n} fields", s.std.len()),
                    ));
                }
                if let Some(i) = s.mean.iter().position(|m| !m.is_finite()) {
                    return Err(config::invalid(
                        &format!("scale.mean[{i}]"),
                        "must be a finite number",
                    ));
                }
                if let Some(i) = s.std.iter().position(|d| !(d.is_finite() && *d > 0.0)) {
                    return Err(config::invalid(
                        &format!("scale.std[{i}]"),
                        format!("must be positive, got {}", s.std[i]),
                    ));
                }
                Some(
                    s.mean
                        .into_iter()
                        .zip(s.std)
                        .map(|(m, d)| (m, 1.0 / d))
                        .collect(),
                )
            }
        };
        let window = match c.shape {
            None => {
                if c.hop.is_some() {
                    return Err(config::invalid("hop", "only applies with `shape`"));
                }
                None
            }
            Some(shape) => {
                if shape.is_empty() || shape.contains(&0) {
                    return Err(config::invalid(
                        "shape",
                        format!("dimensions must be positive, got {shape:?}"),
                    ));
                }
                let elements = shape
                    .iter()
                    .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)));
                let elements = elements.filter(|&e| e <= u64::from(c.max_rows) * n as u64);
                let Some(elements) = elements else {
                    return Err(config::invalid(
                        "shape",
                        format!(
                            "{shape:?} holds more than max_rows ({}) rows of {n} fields",
                            c.max_rows
                        ),
                    ));
                };
                if elements % n as u64 != 0 {
                    return Err(config::invalid(
                        "shape",
                        format!("{shape:?} holds {elements} values, not a multiple of {n} fields"),
                    ));
                }
                let rows = (elements / n as u64) as usize;
                let hop = c.hop.map_or(rows, |h| h as usize);
                if !(1..=rows).contains(&hop) {
                    return Err(config::invalid(
                        "hop",
                        format!("must be between 1 and the window's {rows} rows, got {hop}"),
                    ));
                }
                Some(Windowing {
                    shape,
                    rows,
                    hop,
                    buf: VecDeque::new(),
                })
            }
        };
        if c.stream.as_deref() == Some("") {
            return Err(config::invalid("stream", "must not be empty"));
        }
        Ok(Self {
            format: c.format,
            selector,
            header: c.header,
            delimiter,
            scale,
            window,
            stream: c.stream,
            max_rows: c.max_rows as usize,
        })
    }

    fn fields(&self) -> usize {
        match &self.selector {
            Selector::Names(v) => v.len(),
            Selector::Columns(v) => v.len(),
        }
    }

    /// Encodes one frame. A frame with any bad record is rejected whole: no row of it is
    /// used, so windows never mix in half a frame.
    pub fn process(&mut self, frame: Frame) -> Result<Vec<Frame>, String> {
        let mut rows = match &frame.payload {
            Payload::Json(_) if self.format == Format::Csv => {
                return Err("format is csv but the payload is json".into());
            }
            Payload::Json(text) => self.json_rows(text)?,
            Payload::Bytes(bytes) => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|e| format!("payload is not utf-8 text: {e}"))?;
                if text.trim().is_empty() {
                    return Ok(Vec::new());
                }
                let looks_json = matches!(text.trim_start().chars().next(), Some('{' | '['));
                match self.format {
                    Format::Json => self.json_rows(text)?,
                    Format::Csv => self.csv_rows(text)?,
                    Format::Auto if looks_json => self.json_rows(text)?,
                    Format::Auto => self.csv_rows(text)?,
                }
            }
            other => {
                return Err(format!(
                    "expected a json or bytes payload, got {}",
                    payload_kind(other)
                ));
            }
        };
        if let Some(scale) = &self.scale {
            for row in rows.chunks_exact_mut(scale.len()) {
                for (x, (mean, inv_std)) in row.iter_mut().zip(scale) {
                    *x = (*x - mean) * inv_std;
                }
            }
        }

        let n = self.fields();
        let stream = self.stream.clone().unwrap_or_else(|| frame.stream.clone());
        let make = |shape: Vec<u32>, values: &[f32]| Frame {
            stream: stream.clone(),
            timestamp_ms: frame.timestamp_ms,
            payload: Payload::Tensor(Tensor::from_f32(shape, values)),
            meta: frame.meta.clone(),
        };
        let Some(w) = &mut self.window else {
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            return Ok(vec![make(vec![(rows.len() / n) as u32, n as u32], &rows)]);
        };
        w.buf.extend(rows.drain(..));
        let mut out = Vec::new();
        let mut values = Vec::with_capacity(w.rows * n);
        while w.buf.len() >= w.rows * n {
            values.clear();
            values.extend(w.buf.iter().take(w.rows * n));
            out.push(make(w.shape.clone(), &values));
            w.buf.drain(..w.hop * n);
        }
        Ok(out)
    }

    /// Rows from JSON text: objects, arrays of objects, or objects one after the other
    /// (newline-delimited JSON).
    fn json_rows(&self, text: &str) -> Result<Vec<f32>, String> {
        let Selector::Names(paths) = &self.selector else {
            return Err("json input needs `fields`; `columns` apply to csv".into());
        };
        let mut rows = Vec::new();
        let mut record = 0usize;
        for value in serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>() {
            let value = value.map_err(|e| format!("invalid json after record {record}: {e}"))?;
            let records = match &value {
                serde_json::Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            for r in records {
                if record >= self.max_rows {
                    return Err(format!(
                        "more than max_rows ({}) records in one frame",
                        self.max_rows
                    ));
                }
                if !r.is_object() {
                    return Err(format!("record {record}: expected a json object"));
                }
                for path in paths {
                    let x = match lookup(r, path) {
                        None | Some(serde_json::Value::Null) => {
                            return Err(format!("record {record}: missing field `{path}`"));
                        }
                        Some(v) => number(v)
                            .map_err(|why| format!("record {record}: field `{path}` {why}"))?,
                    };
                    rows.push(x);
                }
                record += 1;
            }
        }
        Ok(rows)
    }

    /// Rows from CSV text, one per non-empty line (`#` starts a comment line).
    fn csv_rows(&self, text: &str) -> Result<Vec<f32>, String> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        let header: Option<Vec<String>> = if self.header {
            match lines.next() {
                Some((_, l)) => Some(
                    split_csv(l, self.delimiter)
                        .into_iter()
                        .map(|c| c.trim().to_owned())
                        .collect(),
                ),
                None => return Ok(Vec::new()),
            }
        } else {
            None
        };
        // Resolve columns (and the names used in errors) once per payload.
        let columns: Vec<(usize, String)> = match (&self.selector, &header) {
            (Selector::Columns(idx), h) => idx
                .iter()
                .map(|&i| {
                    (
                        i,
                        h.as_ref()
                            .and_then(|h| h.get(i))
                            .map_or(format!("column {i}"), |n| format!("column {i} (`{n}`)")),
                    )
                })
                .collect(),
            (Selector::Names(names), Some(h)) => names
                .iter()
                .map(|n| match h.iter().position(|c| c == n) {
                    Some(i) => Ok((i, format!("column {i} (`{n}`)"))),
                    None => Err(format!("header has no column `{n}`")),
                })
                .collect::<Result<_, _>>()?,
            (Selector::Names(_), None) => {
                return Err(
                    "csv input with `fields` needs `header = true`; use `columns` for indices"
                        .into(),
                );
            }
        };
        let mut rows = Vec::new();
        for (count, (i, line)) in lines.enumerate() {
            let line_no = i + 1;
            if count >= self.max_rows {
                return Err(format!(
                    "more than max_rows ({}) lines in one frame",
                    self.max_rows
                ));
            }
            let cells = split_csv(line, self.delimiter);
            for (col, name) in &columns {
                let cell = cells
                    .get(*col)
                    .ok_or_else(|| {
                        format!(
                            "line {line_no}: missing {name} (line has {} columns)",
                            cells.len()
                        )
                    })?
                    .trim();
                if cell.is_empty() {
                    return Err(format!("line {line_no}: {name} is empty"));
                }
                let x = cell
                    .parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| {
                        format!("line {line_no}: {name} is not a finite number: {cell:?}")
                    })?;
                rows.push(x);
            }
        }
        Ok(rows)
    }
}

/// Finds a dotted path: a key that contains the whole path wins, else the path is walked
/// through objects (by key) and arrays (by index).
fn lookup<'a>(value: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    if let Some(v) = value.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(value, |v, seg| match v {
        serde_json::Value::Object(m) => m.get(seg),
        serde_json::Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// A JSON value as a tensor element: numbers, booleans (0/1) and numeric strings.
fn number(v: &serde_json::Value) -> Result<f32, String> {
    let x = match v {
        serde_json::Value::Number(n) => n.as_f64().map(|x| x as f32),
        serde_json::Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        serde_json::Value::String(s) => s.trim().parse::<f32>().ok(),
        _ => None,
    };
    x.filter(|x| x.is_finite())
        .ok_or_else(|| format!("is not a finite number: {v}"))
}

/// Splits one CSV line (RFC 4180 quoting within the line: `"a,b"` and `""` escapes).
fn split_csv(line: &str, delimiter: char) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            c if c == delimiter && !quoted => cells.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    cells.push(cur);
    cells
}

impl edge_guest::Stage for Stage {
    fn from_config(config: &str) -> Result<Self, String> {
        Stage::from_config(config)
    }

    fn process(&mut self, frame: Frame) -> Result<Vec<Frame>, String> {
        Stage::process(self, frame)
    }
}

edge_guest::export_stateful_stage!(Stage);

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(f: &Frame) -> (Vec<u32>, Vec<f32>) {
        let Payload::Tensor(t) = &f.payload else {
            panic!("not a tensor: {:?}", f.payload)
        };
        (t.shape.clone(), t.to_f32().unwrap())
    }

    fn json(text: &str) -> Frame {
        Frame::new("sensors", 42, Payload::Json(text.into()))
    }

    fn csv(text: &str) -> Frame {
        Frame::new("sensors", 42, Payload::Bytes(text.as_bytes().to_vec()))
    }

    #[test]
    fn json_records_to_rows() {
        let mut s = Stage::from_config(r#"{"fields": ["temp", "accel.x", "ok"]}"#).unwrap();
        let out = s.process(json(r#"[{"temp": 20.5, "accel": {"x": -1}, "ok": true}, {"temp": "21", "accel": {"x": 2}, "ok": false}]"#)).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].stream, "sensors");
        assert_eq!(out[0].timestamp_ms, 42);
        assert_eq!(
            tensor(&out[0]),
            (vec![2, 3], vec![20.5, -1.0, 1.0, 21.0, 2.0, 0.0])
        );
    }

    #[test]
    fn ndjson_bytes_and_dotted_keys() {
        let mut s = Stage::from_config(r#"{"fields": ["a.b", "c.1"]}"#).unwrap();
        let out = s
            .process(csv(
                "{\"a.b\": 1, \"c\": [0, 5]}\n{\"a\": {\"b\": 2}, \"c\": [0, 6]}\n",
            ))
            .unwrap();
        assert_eq!(tensor(&out[0]), (vec![2, 2], vec![1.0, 5.0, 2.0, 6.0]));
    }

    #[test]
    fn json_errors_name_record_and_field() {
        let mut s = Stage::from_config(r#"{"fields": ["temp", "hum"]}"#).unwrap();
        let e = s
            .process(json(r#"[{"temp": 1, "hum": 2}, {"temp": 1}]"#))
            .unwrap_err();
        assert_eq!(e, "record 1: missing field `hum`");
        let e = s
            .process(json(r#"{"temp": "warm", "hum": 2}"#))
            .unwrap_err();
        assert!(
            e.starts_with("record 0: field `temp` is not a finite number"),
            "{e}"
        );
        let e = s.process(json(r#"{"temp": 1, "hum": null}"#)).unwrap_err();
        assert_eq!(e, "record 0: missing field `hum`");
    }

    #[test]
    fn csv_columns_with_scaling() {
        let cfg = r#"{"columns": [2, 0], "scale": {"mean": [10.0, 1.0], "std": [2.0, 0.5]}}"#;
        let mut s = Stage::from_config(cfg).unwrap();
        let out = s.process(csv("1,x,12\r\n\n# comment\n2,y,8\n")).unwrap();
        assert_eq!(tensor(&out[0]), (vec![2, 2], vec![1.0, 0.0, -1.0, 2.0]));
    }

    #[test]
    fn csv_header_names_and_quotes() {
        let mut s =
            Stage::from_config(r#"{"fields": ["b", "a"], "header": true, "delimiter": ";"}"#)
                .unwrap();
        let out = s
            .process(csv("a;\"note; with sep\";b\n1;\"x \"\"y\"\"\";3\n"))
            .unwrap();
        assert_eq!(tensor(&out[0]), (vec![1, 2], vec![3.0, 1.0]));
        let e = s.process(csv("a;c\n1;2\n")).unwrap_err();
        assert_eq!(e, "header has no column `b`");
    }

    #[test]
    fn csv_errors_name_line_and_column() {
        let mut s = Stage::from_config(r#"{"columns": [0, 3]}"#).unwrap();
        let e = s.process(csv("1,2,3,4\n1,2,3\n")).unwrap_err();
        assert_eq!(e, "line 2: missing column 3 (line has 3 columns)");
        let e = s.process(csv("1,2,3,abc\n")).unwrap_err();
        assert_eq!(e, "line 1: column 3 is not a finite number: \"abc\"");
        let e = s.process(csv("1,2,3,\n")).unwrap_err();
        assert_eq!(e, "line 1: column 3 is empty");
        let mut s = Stage::from_config(r#"{"columns": [1], "header": true}"#).unwrap();
        let e = s.process(csv("a,speed\n1,fast\n")).unwrap_err();
        assert!(e.starts_with("line 2: column 1 (`speed`)"), "{e}");
    }

    #[test]
    fn windows_across_frames_with_hop() {
        let mut s = Stage::from_config(
            r#"{"columns": [0], "shape": [1, 3, 1], "hop": 2, "stream": "model-in"}"#,
        )
        .unwrap();
        assert!(s.process(csv("1\n2\n")).unwrap().is_empty());
        let out = s.process(csv("3\n4\n5\n")).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].stream, "model-in");
        assert_eq!(tensor(&out[0]), (vec![1, 3, 1], vec![1.0, 2.0, 3.0]));
        assert_eq!(tensor(&out[1]), (vec![1, 3, 1], vec![3.0, 4.0, 5.0]));
        let out = s.process(csv("6\n")).unwrap();
        assert!(out.is_empty());
        let out = s.process(csv("7\n")).unwrap();
        assert_eq!(tensor(&out[0]).1, vec![5.0, 6.0, 7.0]);
    }

    #[test]
    fn bad_frame_leaves_window_untouched() {
        let mut s = Stage::from_config(r#"{"columns": [0], "shape": [2, 1]}"#).unwrap();
        assert!(s.process(csv("1\n")).unwrap().is_empty());
        assert!(s.process(csv("2\nx\n")).is_err());
        assert_eq!(tensor(&s.process(csv("3\n")).unwrap()[0]).1, vec![1.0, 3.0]);
    }

    #[test]
    fn config_errors_name_the_key() {
        for (cfg, key) in [
            ("", "fields:"),
            (r#"{"fields": ["a"], "columns": [1]}"#, "columns:"),
            (r#"{"fields": ["a"], "format": "csv"}"#, "fields:"),
            (r#"{"fields": ["a"], "delimiter": ",,"}"#, "delimiter:"),
            (
                r#"{"fields": ["a", "b"], "scale": {"mean": [0], "std": [1, 1]}}"#,
                "scale.mean:",
            ),
            (
                r#"{"fields": ["a"], "scale": {"mean": [0], "std": [0]}}"#,
                "scale.std[0]:",
            ),
            (r#"{"fields": ["a", "b"], "shape": [1, 3]}"#, "shape:"),
            (r#"{"fields": ["a"], "shape": [0, 1]}"#, "shape:"),
            (r#"{"fields": ["a"], "shape": [4], "hop": 5}"#, "hop:"),
            (r#"{"fields": ["a"], "hop": 1}"#, "hop:"),
            (r#"{"fields": ["a"], "shape": [100000, 100000]}"#, "shape:"),
            (r#"{"fields": ["a"], "format": "xml"}"#, "format:"),
            (r#"{"fields": [""]}"#, "fields[0]:"),
        ] {
            let e = Stage::from_config(cfg).unwrap_err();
            assert!(e.starts_with(key), "{cfg}: {e}");
        }
    }

    #[test]
    fn wrong_payload_and_empty_input() {
        let mut s = Stage::from_config(r#"{"fields": ["a"]}"#).unwrap();
        assert!(
            s.process(Frame::new("x", 0, Payload::Samples(vec![1.0])))
                .unwrap_err()
                .contains("got samples")
        );
        assert!(s.process(csv("")).unwrap().is_empty());
        assert!(s.process(json("[]")).unwrap().is_empty());
    }
}
