//! The manifest's tests: parsing, resolving, and what every path that
//! builds a spec is held to.

use super::*;

fn resolve(text: &str) -> Result<Vec<FunctionSpec>, ManifestError> {
    Manifest::parse(text, Path::new("/m/shoal.toml"))?.resolve()
}

#[test]
fn every_time_a_function_sets_is_bounded_by_the_hosts_maximum() {
    let entry = |limit: &str| format!("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.limits]\n{limit}\n");
    for (limit, says) in [
        ("start_timeout_ms = 300001", "limits.start_timeout_ms = 5m 1ms is over the host's maximum of 5m"),
        ("destroy_timeout_ms = 86400000", "limits.destroy_timeout_ms = 1day is over the host's maximum of 5m"),
        ("queue_timeout_ms = 600000", "limits.queue_timeout_ms = 10m is over the host's maximum of 5m"),
        ("timeout_ms = 3600000", "limits.timeout_ms = 1h is over the host's maximum of 15m"),
        ("idle_timeout_s = 90000", "limits.idle_timeout_s = 1day 1h is over the host's maximum of 1day"),
    ] {
        let err = resolve(&entry(limit)).unwrap_err().to_string();
        assert!(err.contains(says), "{limit}: {err}");
    }
    assert!(resolve(&entry("start_timeout_ms = 300000\ntimeout_ms = 900000\nidle_timeout_s = 86400")).is_ok());
}

#[test]
fn a_function_sets_its_calls_timeouts_retries_and_breakers_within_bounds() {
    let entry = |limit: &str| format!("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.limits]\n{limit}\n");
    let spec =
        resolve(&entry("invoke_timeout_ms = 2500\ncall_retries = 0\nbreaker_failures = 3\nbreaker_cooldown_ms = 750"))
            .unwrap()
            .remove(0);
    let limits = &spec.limits;
    assert_eq!(limits.invoke_timeout, Duration::from_millis(2500));
    assert_eq!((limits.call_retries, limits.breaker_failures.get()), (0, 3));
    assert_eq!(limits.breaker_cooldown, Duration::from_millis(750));
    let defaults = Limits::default();
    assert_eq!((defaults.invoke_timeout, defaults.call_retries), (Duration::from_secs(10), 2));
    for (limit, says) in [
        ("call_retries = 11", "limits.call_retries = 11 is over the host's maximum of 10"),
        ("breaker_failures = 0", "limits.breaker_failures must be greater than 0"),
        ("invoke_timeout_ms = 0", "limits.invoke_timeout_ms must be greater than 0"),
        ("breaker_cooldown_ms = 3600000", "limits.breaker_cooldown_ms = 1h is over the host's maximum of 5m"),
    ] {
        let err = resolve(&entry(limit)).unwrap_err().to_string();
        assert!(err.contains(says), "{limit}: {err}");
    }
    // A spec kept before these limits existed reads with their defaults.
    let mut json = serde_json::to_value(&spec).unwrap();
    for field in ["invoke_timeout", "call_retries", "breaker_failures", "breaker_cooldown"] {
        json["limits"].as_object_mut().unwrap().remove(field);
    }
    let old: FunctionSpec = serde_json::from_value(json).unwrap();
    assert_eq!((old.limits.call_retries, old.limits.breaker_failures.get()), (2, 5));
}

#[test]
fn a_manifest_names_its_tenant_env_and_files() {
    let specs = resolve(
        "tenant = \"team-a\"\n[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n\
         [function.env]\nGREETING = \"hej\"\n\
         [function.grants]\nfiles = [\"./data:/data:ro\", \"/var/x:/x\"]\n",
    )
    .unwrap();
    assert_eq!(specs[0].tenant.as_str(), "team-a");
    assert_eq!(specs[0].env.get("GREETING").map(String::as_str), Some("hej"));
    let files = &specs[0].grants.files;
    assert_eq!(
        (files[0].host.as_path(), files[0].guest.as_str(), files[0].read_only),
        (Path::new("/m/./data"), "/data", true)
    );
    assert_eq!(
        (files[1].host.as_path(), files[1].guest.as_str(), files[1].read_only),
        (Path::new("/var/x"), "/x", false)
    );
    assert_eq!(resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n").unwrap()[0].tenant.as_str(), "default");

    for (bad, why) in [
        ("tenant = \"Team_A\"\n", "invalid tenant"),
        ("[function.grants]\nfiles = [\"./d:data\"]\n", "must be absolute"),
        ("[function.grants]\nfiles = [\"./d:/a/../b\"]\n", "without `..`"),
        ("[function.grants]\nfiles = [\"./d:/d:rx\"]\n", "grants.files entry"),
        ("[function.grants]\nkeyvalue = [\"a/b:k\"]\n", "may not contain `/`"),
        ("[function.grants]\npublish = [\"x/y\"]\n", "may not contain `/`"),
    ] {
        let text = if bad.starts_with("tenant") {
            format!("{bad}[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n")
        } else {
            format!("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n{bad}")
        };
        let err = resolve(&text).unwrap_err().to_string();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

#[test]
fn tenants_scope_names_apart() {
    let default = TenantName::default();
    let a = TenantName::new("a").unwrap();
    assert_eq!(default.scope("orders"), "orders", "the default tenant keeps its names");
    assert_eq!(a.scope("orders"), "a/orders");
    assert_eq!(a.unscope("a/orders"), "orders");
    assert_eq!(default.unscope("orders"), "orders");
    assert!(TenantName::new("-a").is_err() && TenantName::new("a-").is_err() && TenantName::new("").is_err());
}

#[test]
fn relative_wasm_paths_resolve_against_the_manifest_folder() {
    let specs = resolve("[[function]]\nname = \"a\"\nwasm = \"x/a.wasm\"\n").unwrap();
    assert_eq!(specs[0].wasm, Path::new("/m/x/a.wasm"));
    assert_eq!(specs[0].limits, Limits::default());
}

#[test]
fn unknown_limit_fields_are_rejected_with_the_field_name() {
    let err = resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.limits]\ntimeout = 5\n").unwrap_err();
    assert!(err.to_string().contains("timeout"), "{err}");
    assert!(err.to_string().starts_with("/m/shoal.toml"), "{err}");
}

#[test]
fn invalid_names_and_zero_limits_name_the_function_and_field() {
    let err = resolve("[[function]]\nname = \"Bad_Name\"\nwasm = \"a.wasm\"\n").unwrap_err();
    assert!(err.cause.to_string().contains("Bad_Name"), "{err}");
    let err =
        resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.limits]\nmax_concurrency = 0\n").unwrap_err();
    assert!(
        err.cause.to_string().contains("function \"a\"") && err.cause.to_string().contains("max_concurrency"),
        "{err}"
    );
}

#[test]
fn a_manifest_error_keeps_its_cause_typed_and_its_text() {
    use std::error::Error as _;
    let err =
        resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.limits]\nmax_concurrency = 0\n").unwrap_err();
    assert_eq!(err.to_string(), "/m/shoal.toml: function \"a\": limits.max_concurrency must be greater than 0");
    let ManifestCause::Function(invalid) = &*err.cause else { panic!("a function's error: {err:?}") };
    assert_eq!(invalid.source, SpecError::Limit(LimitError::Zero { field: "max_concurrency" }));
    let cause = err.source().and_then(|cause| cause.downcast_ref::<ManifestCause>());
    assert!(matches!(cause, Some(ManifestCause::Function(_))), "{err:?}");

    let err = Manifest::load(Path::new("/nonexistent/shoal.toml")).unwrap_err();
    assert!(err.to_string().starts_with("/nonexistent/shoal.toml: cannot read manifest: "), "{err}");
    let io = err.source().and_then(|cause| cause.source()).and_then(|io| io.downcast_ref::<std::io::Error>());
    assert_eq!(io.map(std::io::Error::kind), Some(std::io::ErrorKind::NotFound));
}

#[test]
fn reserved_paths_cannot_be_routes() {
    let err = resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\nroutes = [\"/metrics\"]\n").unwrap_err();
    assert!(err.cause.to_string().contains("reserved"), "{err}");
}

#[test]
fn two_entries_of_one_function_need_versions() {
    let text = "[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[[function]]\nname = \"a\"\nwasm = \"b.wasm\"\n";
    let err = resolve(text).unwrap_err();
    assert!(err.cause.to_string().contains("own `version`"), "{err}");
    let text = "[[function]]\nname = \"a\"\nversion = \"1\"\nweight = 90\nwasm = \"a.wasm\"\n\
                [[function]]\nname = \"a\"\nversion = \"2\"\nweight = 10\nwasm = \"b.wasm\"\n";
    assert_eq!(resolve(text).unwrap().len(), 2);
}

#[test]
fn grants_resolve_and_check_keys_by_bucket_and_pattern() {
    let text = "[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.grants]\n\
                keyvalue = [\"default:hello/*\", \"cache:exact\"]\noutbound_http = [\"127.0.0.1:9000\"]\n\
                config = { greeting = \"hi\" }\n";
    let grants = resolve(text).unwrap().remove(0).grants;
    assert!(grants.allows_key("default", "hello/x"));
    assert!(!grants.allows_key("default", "other"));
    assert!(grants.allows_key("cache", "exact") && !grants.allows_key("cache", "exact2"));
    assert!(grants.opens_bucket("cache") && !grants.opens_bucket("secret"));
    assert_eq!(grants.config["greeting"], "hi");
    let err = resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.grants]\nkeyvalue = [\"nobucket\"]\n")
        .unwrap_err();
    assert!(err.cause.to_string().contains("grants.keyvalue"), "{err}");
    let err = resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.grants]\noutbound_http = [\"x\"]\n")
        .unwrap_err();
    assert!(err.cause.to_string().contains("host:port"), "{err}");
}

#[test]
fn a_function_whose_only_version_has_weight_zero_is_refused() {
    let err = resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\nweight = 0\n").unwrap_err();
    assert!(err.cause.to_string().contains("weight 0"), "{err}");
}

#[test]
fn a_spec_from_json_gets_the_manifests_checks() {
    let spec = resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\nroutes = [\"/a\"]\n").unwrap().remove(0);
    let json = serde_json::to_value(&spec).unwrap();
    let back: FunctionSpec = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, spec, "a valid spec survives the round trip");

    let with = |path: &[&str], value: serde_json::Value| {
        let mut json = json.clone();
        let mut slot = &mut json;
        for key in path {
            slot = &mut slot[*key];
        }
        *slot = value;
        serde_json::from_value::<FunctionSpec>(json).unwrap_err().to_string()
    };
    let zero = with(&["limits", "max_concurrency"], 0.into());
    assert!(zero.contains("limits.max_concurrency must be greater than 0"), "{zero}");
    assert!(with(&["limits", "fuel_per_request"], 0.into()).contains("limits.fuel_per_request"));
    assert!(with(&["limits", "timeout"], 0.into()).contains("limits.timeout_ms must be greater than 0"));
    assert!(with(&["limits", "memory_bytes"], (8u64 << 30).into()).contains("over the host's maximum"));
    assert!(with(&["name"], "Bad_Name".into()).contains("invalid name"));
    assert!(with(&["version"], "a b".into()).contains("invalid version"));
    let reserved = serde_json::json!([{ "host": null, "prefix": "/metrics" }]);
    assert!(with(&["routes"], reserved).contains("reserved"));
    let grant = serde_json::json!({ "outbound_http": ["nohost"], "keyvalue": [], "publish": [], "subscribe": [],
        "invoke": [], "config": {}, "secrets": [] });
    assert!(with(&["grants"], grant).contains("host:port"));
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn fuzz_any_text_is_a_manifest_or_an_error_naming_the_file(text in ".{0,400}") {
            match Manifest::parse(&text, Path::new("/m/shoal.toml")).and_then(|m| m.resolve()) {
                Ok(specs) => prop_assert!(!specs.is_empty()),
                Err(err) => prop_assert!(err.to_string().starts_with("/m/shoal.toml: "), "{}", err),
            }
        }

        /// Whatever a manifest says, `resolve` accepts it exactly when
        /// every value is valid (checked here by plain rules), and what
        /// it accepts survives the JSON round trip of the admin API and
        /// the registry file unchanged.
        #[test]
        fn fuzz_resolve_accepts_exactly_the_valid_values(
            name in prop_oneof![4 => "[a-z][a-z0-9-]{0,20}", 1 => "[a-zA-Z0-9_-]{0,70}"],
            version in prop_oneof![
                2 => Just(None),
                2 => "[a-zA-Z0-9._-]{1,10}".prop_map(Some),
                1 => "[a-zA-Z0-9._ -]{0,70}".prop_map(Some),
            ],
            route in prop::sample::select(vec![
                "/a", "/", "/a/b/", "h.example/x", "/a", "/", "/a/b/", "h.example/x", "nohost", "/metrics", "/a?b",
            ]),
            weight in prop::option::of(0u32..3),
            limits in prop::collection::btree_map(
                prop::sample::select(vec![
                    "timeout_ms", "memory_mb", "max_concurrency", "queue_timeout_ms", "idle_timeout_s",
                    "fuel_per_request", "kv_max_key_bytes", "publish_per_second", "max_request_bytes",
                    "log_bytes_per_second", "max_requests_per_instance", "instance_concurrency",
                ]),
                prop::sample::select(vec![1u64, 5000, 4096, 1, 5000, 0, 4097, 1 << 40]),
                0..5,
            ),
            outbound in prop::sample::select(vec![
                "127.0.0.1:9000", "127.0.0.1:9000", "127.0.0.1:9000", "127.0.0.1:9000", "host", "h:99999", ":80", "a b:1",
            ]),
        ) {
            let mut text = format!("[[function]]\nname = {name:?}\nwasm = \"a.wasm\"\nroutes = [{route:?}]\n");
            if let Some(version) = &version {
                text.push_str(&format!("version = {version:?}\n"));
            }
            if let Some(weight) = weight {
                text.push_str(&format!("weight = {weight}\n"));
            }
            text.push_str(&format!("[function.grants]\noutbound_http = [{outbound:?}]\n[function.limits]\n"));
            for (field, value) in &limits {
                text.push_str(&format!("{field} = {value}\n"));
            }

            let name_ok = !name.is_empty() && name.len() <= 63 && name.starts_with(|c: char| c.is_ascii_lowercase())
                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            let version_ok = version.as_ref().is_none_or(|v| {
                !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
            });
            let route_ok = ["/a", "/", "/a/b/", "h.example/x"].contains(&route);
            let outbound_ok = outbound == "127.0.0.1:9000";
            // (How often each kind of case comes up, for a run with --nocapture.)
            let _ = (name_ok, version_ok, route_ok, outbound_ok);
            let limit_ok = |field: &str, value: u64| match field {
                "queue_timeout_ms" => value <= 300_000,
                "timeout_ms" => (1..=900_000).contains(&value),
                "idle_timeout_s" => (1..=86_400).contains(&value),
                "memory_mb" => (1..=4096).contains(&value),
                "max_concurrency" | "publish_per_second" | "log_bytes_per_second" | "max_requests_per_instance" => {
                    (1..=u64::from(u32::MAX)).contains(&value)
                }
                "instance_concurrency" => (1..=1024).contains(&value),
                _ => value > 0,
            };
            let limits_ok = limits.iter().all(|(field, value)| limit_ok(field, *value));
            let weight_ok = weight != Some(0);
            let valid = name_ok && version_ok && route_ok && outbound_ok && limits_ok && weight_ok;

            let resolved = Manifest::parse(&text, Path::new("/m/shoal.toml")).and_then(|m| m.resolve());
            prop_assert_eq!(resolved.is_ok(), valid, "{}\n{:?}", text, resolved);
            if let Ok(specs) = resolved {
                let json = serde_json::to_string(&specs[0]).unwrap();
                let back: FunctionSpec = serde_json::from_str(&json).unwrap();
                prop_assert_eq!(&back, &specs[0]);
            }
        }
    }
}

#[test]
fn routes_parse_into_host_and_prefix() {
    let route = Route::parse("api.example.com/v1/").unwrap();
    assert_eq!((route.host.as_deref(), route.prefix.as_str()), (Some("api.example.com"), "/v1"));
    assert_eq!(Route::parse("/").unwrap().prefix, "/");
    assert!(Route::parse("nohost").is_err());
    assert!(Route::parse("/a?b").is_err());
}
