//! Hand-written JSON for `target/bench/results.json`: objects keep the order
//! in which their keys are set.

use backupd::json::json_str;

#[derive(Debug, Clone)]
pub(crate) enum J {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

macro_rules! json_number {
    ($($t:ty),*) => {$(
        impl From<$t> for J {
            fn from(x: $t) -> J {
                J::Num(x as f64)
            }
        }
    )*};
}
json_number!(f64, u64, usize, u32, i32);

impl From<bool> for J {
    fn from(x: bool) -> J {
        J::Bool(x)
    }
}
impl From<&str> for J {
    fn from(x: &str) -> J {
        J::Str(x.to_string())
    }
}
impl From<String> for J {
    fn from(x: String) -> J {
        J::Str(x)
    }
}
impl<T: Into<J>> From<Option<T>> for J {
    fn from(x: Option<T>) -> J {
        x.map_or(J::Null, Into::into)
    }
}
impl<T: Into<J>> From<Vec<T>> for J {
    fn from(x: Vec<T>) -> J {
        J::Arr(x.into_iter().map(Into::into).collect())
    }
}

impl J {
    pub(crate) fn obj() -> J {
        J::Obj(Vec::new())
    }

    pub(crate) fn set(&mut self, key: &str, v: impl Into<J>) {
        if let J::Obj(m) = self {
            m.push((key.to_string(), v.into()));
        }
    }

    pub(crate) fn render(&self, out: &mut String, indent: usize) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(x) => out.push_str(&json_num(*x)),
            J::Str(s) => json_str_to(s, out),
            J::Arr(a) if a.iter().all(|x| !matches!(x, J::Arr(_) | J::Obj(_))) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    x.render(out, indent);
                }
                out.push(']');
            }
            J::Arr(a) => {
                out.push_str("[\n");
                for (i, x) in a.iter().enumerate() {
                    out.push_str(&" ".repeat(indent + 2));
                    x.render(out, indent + 2);
                    out.push_str(if i + 1 < a.len() { ",\n" } else { "\n" });
                }
                out.push_str(&" ".repeat(indent));
                out.push(']');
            }
            J::Obj(m) if m.is_empty() => out.push_str("{}"),
            J::Obj(m) => {
                out.push_str("{\n");
                for (i, (k, v)) in m.iter().enumerate() {
                    out.push_str(&" ".repeat(indent + 2));
                    json_str_to(k, out);
                    out.push_str(": ");
                    v.render(out, indent + 2);
                    out.push_str(if i + 1 < m.len() { ",\n" } else { "\n" });
                }
                out.push_str(&" ".repeat(indent));
                out.push('}');
            }
        }
    }
}

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

pub(crate) fn json_str_to(s: &str, out: &mut String) {
    out.push_str(&json_str(s));
}
