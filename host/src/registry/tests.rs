//! The registry's own tests (deploys through a real engine are in the
//! integration tests).

use super::*;

fn map(routes: &[&str]) -> RouteMap<String> {
    let mut map = RouteMap::default();
    for text in routes {
        map.insert(&Route::parse(text).unwrap(), text.to_string());
    }
    map
}

#[test]
fn routes_match_on_segment_boundaries_and_hosts() {
    let hello = map(&["/hello"]);
    assert!(hello.lookup(None, "/hello").is_some());
    assert!(hello.lookup(None, "/hello/world").is_some());
    assert!(hello.lookup(None, "/helloworld").is_none());
    let api = map(&["api.example.com/v1/"]);
    assert!(api.lookup(Some("API.example.com:8080"), "/v1/x").is_some());
    assert!(api.lookup(Some("other"), "/v1/x").is_none());
    assert!(api.lookup(None, "/v1/x").is_none());
    assert!(map(&["/"]).lookup(None, "/anything").is_some());
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// The routing rules, written as plainly as possible: the host's
    /// own routes first, then host-less ones; the longest prefix that
    /// matches on a segment boundary wins.
    fn reference<'a>(routes: &'a [Route], host: Option<&str>, path: &str) -> Option<&'a Route> {
        let host = host.map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name).to_ascii_lowercase());
        let matches = |route: &Route| {
            route.prefix == "/" || path == route.prefix || path.starts_with(&format!("{}/", route.prefix))
        };
        let best = |wanted: Option<&String>| {
            routes
                .iter()
                .filter(|route| route.host.as_ref() == wanted && matches(route))
                .max_by_key(|route| route.prefix.len())
        };
        host.as_ref().and_then(|host| best(Some(host))).or_else(|| best(None))
    }

    fn segments() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "ab", "a.b"]), 0..4)
            .prop_map(|parts| format!("/{}", parts.join("/")))
    }

    fn route() -> impl Strategy<Value = String> {
        (prop::option::of(prop::sample::select(vec!["x.example", "y.example"])), segments())
            .prop_map(|(host, prefix)| format!("{}{prefix}", host.unwrap_or("")))
    }

    proptest! {
        #[test]
        fn fuzz_routing_agrees_with_the_reference_model(
            routes in prop::collection::vec(route(), 0..8),
            host in prop::option::of(prop::sample::select(vec!["x.example", "X.EXAMPLE:8080", "y.example", "z"])),
            path in segments(),
            trailing_slash in any::<bool>(),
        ) {
            let path = if trailing_slash && path != "/" { format!("{path}/") } else { path };
            let parsed: Vec<Route> = routes.iter().map(|text| Route::parse(text).unwrap()).collect();
            let mut map = RouteMap::default();
            for route in &parsed {
                map.insert(route, route.clone());
            }
            let expected = reference(&parsed, host, &path);
            let found = map.lookup(host, &path);
            prop_assert_eq!(found.map(|r| (&r.host, &r.prefix)), expected.map(|r| (&r.host, &r.prefix)),
                "routes {:?}, host {:?}, path {:?}", routes, host, path);
        }
    }
}

#[test]
fn a_host_route_wins_over_a_longer_host_less_prefix() {
    let routes = map(&["/hello/deeper", "api.example/"]);
    assert_eq!(routes.lookup(Some("api.example"), "/hello/deeper/x").map(String::as_str), Some("api.example/"));
    assert_eq!(routes.lookup(None, "/hello/deeper/x").map(String::as_str), Some("/hello/deeper"));
}
