//! Every key of `whizbang::Config` is documented in `docs/configuration.md` and present in
//! `config/whizbang.toml` (the file that shows every knob at its default).
//!
//! The key list comes from the code, not from a list written here: `Config` is deserialized
//! from a recording deserializer. serde's derive hands `deserialize_struct` the names of all of
//! a struct's fields, so the recorder learns every section and every key, and answers each leaf
//! with a neutral value (0, "", none, the first variant of an enum). A field added to any
//! section becomes a key this test looks for; a row of the reference naming a key the code does
//! not have fails it too. It reads files only.

use serde::Deserialize;
use serde::de::value::{Error, MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// What the recorder saw: every field path (`store.backend`) and the paths that are tables.
#[derive(Default)]
struct Seen {
    fields: BTreeSet<String>,
    tables: BTreeSet<String>,
}

/// A deserializer that records the field names of every struct it is asked for.
struct Recorder<'a> {
    path: String,
    seen: &'a RefCell<Seen>,
}

impl Recorder<'_> {
    fn child(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.path)
        }
    }
}

/// Walks a struct's fields, each with a recorder of its own path.
struct Fields<'a> {
    parent: &'a Recorder<'a>,
    rest: std::slice::Iter<'static, &'static str>,
    current: &'static str,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.rest.next() {
            Some(&field) => {
                self.current = field;
                seed.deserialize(field.into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let path = self.parent.child(self.current);
        self.parent.seen.borrow_mut().fields.insert(path.clone());
        seed.deserialize(Recorder {
            path,
            seen: self.parent.seen,
        })
    }
}

fn empty_map() -> MapDeserializer<'static, std::iter::Empty<((), ())>, Error> {
    MapDeserializer::new(std::iter::empty())
}

fn empty_seq() -> SeqDeserializer<std::iter::Empty<()>, Error> {
    SeqDeserializer::new(std::iter::empty())
}

impl<'de> Deserializer<'de> for Recorder<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Error> {
        Err(de::Error::custom(format!(
            "`{}`: a field type the recorder does not know; teach tests/config_reference.rs its neutral value",
            self.path
        )))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.seen.borrow_mut().tables.insert(self.path.clone());
        visitor.visit_map(Fields {
            parent: &self,
            rest: fields.iter(),
            current: "",
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let first: &'static str = variants.first().copied().unwrap_or_default();
        visitor.visit_enum(first.into_deserializer())
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_bool(false)
    }
    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i8(0)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i16(0)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i32(0)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i64(0)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u8(0)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u16(0)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u32(0)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u64(0)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_f32(0.0)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_f64(0.0)
    }
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_char(' ')
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_str("")
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_string(String::new())
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_bytes(&[])
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_byte_buf(Vec::new())
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_none()
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(empty_seq())
    }
    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_any(visitor)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_any(visitor)
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(empty_map())
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_any(visitor)
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

/// Every configuration key of the code, as `section.key` (`transport.amqp.flavour` for the
/// nested section).
fn config_keys() -> BTreeSet<String> {
    let seen = RefCell::new(Seen::default());
    whizbang::Config::deserialize(Recorder {
        path: String::new(),
        seen: &seen,
    })
    .unwrap_or_else(|e| panic!("recording the keys of Config failed: {e}"));
    let seen = seen.into_inner();
    let keys: BTreeSet<String> = seen
        .fields
        .into_iter()
        .filter(|path| !seen.tables.contains(path))
        .collect();
    // The recorder really saw the sections: a handful of keys known to exist, one per level.
    for known in [
        "service.name",
        "store.backend",
        "transport.amqp.flavour",
        "routing.topics",
    ] {
        assert!(
            keys.contains(known),
            "the recorder missed `{known}`: {keys:?}"
        );
    }
    assert!(
        keys.iter().all(|k| k.contains('.')),
        "a key outside any section: {keys:?}"
    );
    keys
}

fn read(relative: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Whether `key` is set in the TOML file, or written there commented out (`# key = …`) in its
/// section, as the file does for keys whose default depends on another (the address templates).
fn in_toml_file(text: &str, table: &toml::Table, key: &str) -> bool {
    let (section, leaf) = key.rsplit_once('.').expect("keys have a section");
    let mut value: Option<&toml::Value> = None;
    let mut current = table;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        match current.get(*part) {
            Some(toml::Value::Table(t)) if i + 1 < parts.len() => current = t,
            Some(v) if i + 1 == parts.len() => value = Some(v),
            _ => break,
        }
    }
    if value.is_some() {
        return true;
    }
    let header = format!("[{section}]");
    let mut in_section = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == header;
        } else if in_section
            && let Some(rest) = line.strip_prefix('#')
            && rest
                .trim_start()
                .strip_prefix(leaf)
                .is_some_and(|r| r.trim_start().starts_with('='))
        {
            return true;
        }
    }
    false
}

#[test]
fn every_config_key_is_in_the_reference_and_in_the_shipped_file() {
    let keys = config_keys();
    let doc = read("docs/configuration.md");
    let file = read("config/whizbang.toml");
    let table: toml::Table = file.parse().expect("config/whizbang.toml parses");

    let undocumented: Vec<&String> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "keys of whizbang::Config missing from docs/configuration.md (write each as `section.key`): {undocumented:?}"
    );

    let not_in_file: Vec<&String> = keys
        .iter()
        .filter(|k| !in_toml_file(&file, &table, k))
        .collect();
    assert!(
        not_in_file.is_empty(),
        "keys of whizbang::Config missing from config/whizbang.toml (set it to its default with a comment): {not_in_file:?}"
    );
}

#[test]
fn the_reference_names_no_key_the_code_lacks() {
    let keys = config_keys();
    let doc = read("docs/configuration.md");
    // The first column of the reference's key tables (those whose header is `| key |`).
    let mut in_key_table = false;
    let mut stale = Vec::new();
    for line in doc.lines() {
        if !line.starts_with('|') {
            in_key_table = false;
        } else if line.starts_with("| key |") {
            in_key_table = true;
        } else if in_key_table
            && let Some(name) = line.strip_prefix("| `").and_then(|r| r.split('`').next())
            && !keys.contains(name)
        {
            stale.push(name.to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "docs/configuration.md lists keys whizbang::Config does not have: {stale:?}"
    );
}
