// A Shoal HTTP function in JavaScript, built with componentize-js.
//
//   GET  /hello-js?name=x     -> "hello, x"
//   POST /hello-js/count      -> increments "hits" in bucket "default"
//   GET  /hello-js/greeting   -> the `greeting` config value
//   POST /hello-js/publish    -> publishes the body on topic "orders"
//
// The Runtime ABI comes in as ES modules named after its WIT interfaces;
// a refused call throws (its `payload` is the ABI's error value).

import { open } from "wasi:keyvalue/store@0.2.0-draft";
import { increment } from "wasi:keyvalue/atomics@0.2.0-draft";
import { get as configGet } from "wasi:config/store@0.2.0-rc.1";
import { publish } from "shoal:runtime/pubsub@0.1.0";

addEventListener("fetch", (event) => event.respondWith(handle(event.request)));

async function handle(request) {
  const url = new URL(request.url);
  const action = url.pathname.split("/").pop();
  try {
    if (action === "count" && request.method === "POST") {
      const hits = increment(open("default"), "hits", 1n);
      return new Response(`${hits}\n`);
    }
    if (action === "greeting") {
      const greeting = configGet("greeting");
      return greeting === undefined
        ? new Response("no greeting configured\n", { status: 404 })
        : new Response(`${greeting}\n`);
    }
    if (action === "publish" && request.method === "POST") {
      publish("orders", new Uint8Array(await request.arrayBuffer()));
      return new Response("published\n", { status: 202 });
    }
    const name = url.searchParams.get("name") ?? "world";
    return new Response(`hello, ${name}\n`);
  } catch (error) {
    // An ABI refusal: say which, as the Rust examples do.
    return new Response(`refused: ${describe(error)}\n`, { status: 403 });
  }
}

function describe(error) {
  const value = error?.payload ?? error;
  if (value && typeof value === "object" && "tag" in value) {
    return value.val === undefined ? value.tag : `${value.tag}: ${value.val}`;
  }
  return String(value);
}
