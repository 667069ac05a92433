//! A KMS key policy evaluator for the subset of the policy language that
//! the example policies in `keys/` use, so that a test can replay the KMS
//! calls a run made against them (LocalStack does not enforce key
//! policies):
//!
//! - statements with `Effect` `Allow` or `Deny`, `Principal` `{"AWS": ARN
//!   or [ARN…]}`, `Action` a name or a list (with `*` wildcards:
//!   `kms:ReEncrypt*`), `Resource` `"*"`;
//! - `Condition` with `StringEquals` on `kms:EncryptionContext:KEY` (the
//!   request's encryption context), `kms:SigningAlgorithm` and
//!   `kms:MessageType`, a value or a list of values (any may match).
//!
//! An explicit deny wins, then any allow; nothing matching is denied. Any
//! other element, operator or condition key panics: a policy that grows
//! beyond this subset must grow the evaluator with it, not be judged by a
//! part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// The account and role names the example policies use.
pub const ACCOUNT: &str = "111122223333";

/// The principal of a role's example policy (`worker`, `revealer`, …).
pub fn role_arn(role: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/pii-vault-{role}")
}

/// One request as a key policy sees it: the IAM action (`kms:Decrypt`;
/// a `ReEncrypt` is two, `kms:ReEncryptFrom` under its source context and
/// `kms:ReEncryptTo` under its destination context) and its context.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Request {
    pub action: String,
    pub context: BTreeMap<String, String>,
    /// Other condition values: `kms:SigningAlgorithm`, `kms:MessageType`.
    pub values: BTreeMap<String, String>,
}

impl Request {
    /// `kms:OP` with `purpose=PURPOSE` (no context when `None`).
    pub fn new(op: &str, purpose: Option<&str>) -> Request {
        Request {
            action: format!("kms:{op}"),
            context: purpose
                .map(|p| BTreeMap::from([("purpose".to_string(), p.to_string())]))
                .unwrap_or_default(),
            values: BTreeMap::new(),
        }
    }

    /// The purpose in its context, for messages.
    pub fn purpose(&self) -> &str {
        self.context.get("purpose").map_or("-", String::as_str)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// An `Allow` matched nothing.
    ImplicitDeny,
    /// A `Deny` statement matched (its `Sid` is in the policy).
    ExplicitDeny,
}

/// A key policy, read from its JSON.
pub struct Policy {
    statements: Vec<Value>,
}

impl Policy {
    pub fn load(path: &Path) -> Policy {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Policy::parse(&text)
    }

    pub fn parse(text: &str) -> Policy {
        let doc: Value = serde_json::from_str(text).expect("a key policy is JSON");
        assert_eq!(doc["Version"], "2012-10-17", "policy version");
        let statements = doc["Statement"]
            .as_array()
            .expect("Statement is a list")
            .clone();
        for s in &statements {
            for k in s.as_object().expect("a statement is an object").keys() {
                assert!(
                    [
                        "Sid",
                        "Effect",
                        "Principal",
                        "Action",
                        "Resource",
                        "Condition"
                    ]
                    .contains(&k.as_str()),
                    "statement element {k} is outside the evaluated subset"
                );
            }
            assert_eq!(s["Resource"], "*", "only Resource \"*\" is evaluated");
        }
        Policy { statements }
    }

    /// What the policy decides for `principal` making `req`.
    pub fn decide(&self, principal: &str, req: &Request) -> Decision {
        let mut allowed = false;
        for s in &self.statements {
            if !principal_matches(&s["Principal"], principal)
                || !strings(&s["Action"]).iter().any(|a| glob(a, &req.action))
                || !conditions_hold(&s["Condition"], req)
            {
                continue;
            }
            match s["Effect"].as_str() {
                Some("Deny") => return Decision::ExplicitDeny,
                Some("Allow") => allowed = true,
                other => panic!("Effect {other:?} is outside the evaluated subset"),
            }
        }
        if allowed {
            Decision::Allow
        } else {
            Decision::ImplicitDeny
        }
    }
}

/// A string or a list of strings.
fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().expect("a list of strings").to_string())
            .collect(),
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

fn principal_matches(p: &Value, principal: &str) -> bool {
    let obj = p.as_object().expect("Principal is {\"AWS\": …}");
    for k in obj.keys() {
        assert_eq!(
            k, "AWS",
            "principal type {k} is outside the evaluated subset"
        );
    }
    strings(&p["AWS"]).iter().any(|a| a == principal)
}

/// IAM's action match: case-insensitive, `*` any run of characters.
fn glob(pattern: &str, action: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some((c, rest)) => s
                .split_first()
                .is_some_and(|(d, srest)| c.eq_ignore_ascii_case(d) && go(rest, srest)),
        }
    }
    go(pattern.as_bytes(), action.as_bytes())
}

fn conditions_hold(c: &Value, req: &Request) -> bool {
    let Some(ops) = c.as_object() else {
        assert!(c.is_null(), "Condition is an object");
        return true;
    };
    ops.iter().all(|(op, keys)| {
        assert_eq!(
            op, "StringEquals",
            "condition operator {op} is outside the evaluated subset"
        );
        keys.as_object()
            .expect("StringEquals holds keys")
            .iter()
            .all(|(key, want)| {
                let have = if let Some(k) = key.strip_prefix("kms:EncryptionContext:") {
                    req.context.get(k)
                } else if ["kms:SigningAlgorithm", "kms:MessageType"].contains(&key.as_str()) {
                    req.values.get(key)
                } else {
                    panic!("condition key {key} is outside the evaluated subset")
                };
                // A key the request does not carry never equals anything.
                have.is_some_and(|h| strings(want).iter().any(|w| w == h))
            })
    })
}

/// The policy requests of one recorded KMS call: `(operation, key id,
/// context, destination context)` as the proxy saw them.
pub fn requests_of(call: &crate::common::aws_proxy::Call) -> Vec<Request> {
    let value = |k: &str| {
        call.request
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let mut values = BTreeMap::new();
    if let Some(v) = value("SigningAlgorithm") {
        values.insert("kms:SigningAlgorithm".to_string(), v);
    }
    if let Some(v) = value("MessageType") {
        values.insert("kms:MessageType".to_string(), v);
    }
    let req = |action: &str, context: &BTreeMap<String, String>| Request {
        action: format!("kms:{action}"),
        context: context.clone(),
        values: values.clone(),
    };
    if call.operation == "ReEncrypt" {
        vec![
            req("ReEncryptFrom", &call.context),
            req("ReEncryptTo", &call.destination_context),
        ]
    } else {
        vec![req(&call.operation, &call.context)]
    }
}

#[test]
fn the_evaluator_follows_deny_allow_and_conditions() {
    let p = Policy::parse(
        r#"{"Version": "2012-10-17", "Statement": [
          {"Effect": "Allow", "Principal": {"AWS": "arn:r"}, "Action": ["kms:Decrypt", "kms:Describe*"],
           "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:purpose": ["a", "b"]}}},
          {"Effect": "Deny", "Principal": {"AWS": ["arn:r"]}, "Action": "kms:decrypt",
           "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:purpose": "b"}}},
          {"Effect": "Allow", "Principal": {"AWS": "arn:r"}, "Action": "kms:ReEncrypt*", "Resource": "*"}
        ]}"#,
    );
    let d = |op: &str, purpose: Option<&str>| p.decide("arn:r", &Request::new(op, purpose));
    assert_eq!(d("Decrypt", Some("a")), Decision::Allow);
    assert_eq!(d("Decrypt", Some("b")), Decision::ExplicitDeny);
    assert_eq!(d("Decrypt", Some("c")), Decision::ImplicitDeny);
    assert_eq!(d("Decrypt", None), Decision::ImplicitDeny);
    assert_eq!(d("DescribeKey", Some("a")), Decision::Allow);
    assert_eq!(d("DescribeKey", None), Decision::ImplicitDeny);
    assert_eq!(d("ReEncryptFrom", None), Decision::Allow);
    assert_eq!(d("Encrypt", Some("a")), Decision::ImplicitDeny);
    assert_eq!(
        p.decide("arn:other", &Request::new("Decrypt", Some("a"))),
        Decision::ImplicitDeny
    );
}
