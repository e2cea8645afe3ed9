//! A minimal JSON writer that lays objects out like qemu-img's pretty printer (four-space
//! indentation, keys in insertion order), so `--output json` diffs cleanly against qemu-img.

use crate::args::json_str;

/// An ordered JSON object under construction; values are stored pre-rendered except nested
/// objects and lists, which are indented when the whole tree is rendered.
#[derive(Default)]
pub struct Obj {
    fields: Vec<(String, Value)>,
}

enum Value {
    Raw(String),
    Obj(Obj),
    List(Vec<Obj>),
    Strs(Vec<String>),
}

impl Obj {
    /// An empty object.
    pub fn new() -> Obj {
        Obj::default()
    }

    /// Adds a value that is already valid JSON text.
    pub fn raw(&mut self, k: &str, v: String) {
        self.fields.push((k.to_string(), Value::Raw(v)));
    }

    /// Adds a number.
    pub fn num(&mut self, k: &str, v: u64) {
        self.raw(k, v.to_string());
    }

    /// Adds a string.
    pub fn str(&mut self, k: &str, v: &str) {
        self.raw(k, json_str(v));
    }

    /// Adds a boolean.
    pub fn bool(&mut self, k: &str, v: bool) {
        self.raw(k, v.to_string());
    }

    /// Adds a nested object.
    pub fn obj(&mut self, k: &str, v: Obj) {
        self.fields.push((k.to_string(), Value::Obj(v)));
    }

    /// Adds a list of objects.
    pub fn list(&mut self, k: &str, v: Vec<Obj>) {
        self.fields.push((k.to_string(), Value::List(v)));
    }

    /// Adds a list of strings.
    pub fn strs(&mut self, k: &str, v: Vec<String>) {
        self.fields.push((k.to_string(), Value::Strs(v)));
    }

    /// Renders the object; `level` is the indentation depth of its opening brace.
    pub fn render(&self, level: usize) -> String {
        let pad = "    ".repeat(level + 1);
        let mut s = String::from("{\n");
        for (i, (k, v)) in self.fields.iter().enumerate() {
            s.push_str(&pad);
            s.push_str(&json_str(k));
            s.push_str(": ");
            match v {
                Value::Raw(r) => s.push_str(r),
                Value::Obj(o) => s.push_str(&o.render(level + 1)),
                Value::Strs(l) => {
                    s.push_str("[\n");
                    let inner = "    ".repeat(level + 2);
                    for (j, v) in l.iter().enumerate() {
                        s.push_str(&inner);
                        s.push_str(&json_str(v));
                        if j + 1 < l.len() {
                            s.push(',');
                        }
                        s.push('\n');
                    }
                    s.push_str(&pad);
                    s.push(']');
                }
                Value::List(l) => {
                    s.push_str("[\n");
                    let inner = "    ".repeat(level + 2);
                    for (j, o) in l.iter().enumerate() {
                        s.push_str(&inner);
                        s.push_str(&o.render(level + 2));
                        if j + 1 < l.len() {
                            s.push(',');
                        }
                        s.push('\n');
                    }
                    s.push_str(&pad);
                    s.push(']');
                }
            }
            if i + 1 < self.fields.len() {
                s.push(',');
            }
            s.push('\n');
        }
        s.push_str(&"    ".repeat(level));
        s.push('}');
        s
    }
}
