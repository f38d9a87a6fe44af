//! `target/bench/results.json` is written with serde_json (a dev-dependency,
//! the same reader the tests use; its `preserve_order` feature keeps an
//! object's keys in the order they are set). [`J`] is its `Value`; [`Obj`]
//! adds the two calls the scenarios build their objects with.

pub(crate) use serde_json::Value as J;

/// Objects built key by key.
pub(crate) trait Obj {
    /// An empty object.
    fn obj() -> J;
    /// Set `key` (a no-op on anything but an object).
    fn set(&mut self, key: &str, v: impl Into<J>);
}

impl Obj for J {
    fn obj() -> J {
        J::Object(serde_json::Map::new())
    }

    fn set(&mut self, key: &str, v: impl Into<J>) {
        if let J::Object(m) = self {
            m.insert(key.to_string(), v.into());
        }
    }
}

/// The document as written: pretty, numbers of 4 decimals at most (a
/// non-finite figure is already `null`: serde_json's `From<f64>`).
pub(crate) fn render(v: &J) -> String {
    let mut v = v.clone();
    round(&mut v);
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

fn round(v: &mut J) {
    match v {
        J::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            *v = if x == x.trunc() && x.abs() < 1e15 {
                J::from(x as i64)
            } else {
                J::from((x * 1e4).round() / 1e4)
            };
        }
        J::Array(a) => a.iter_mut().for_each(round),
        J::Object(m) => m.values_mut().for_each(round),
        _ => {}
    }
}

/// A number as the report prints it: an integer without decimals, else at
/// most 4 decimals; "null" when not finite.
pub(crate) fn json_num(x: f64) -> String {
    if !x.is_finite() {
        "null".into()
    } else if x == x.trunc() && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        let s = format!("{x:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}
