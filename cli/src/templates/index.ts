// A Shoal HTTP function in TypeScript: compiled by tsc, built into a
// component by componentize-js.
//
//   GET  /hello-ts?name=x     -> "hello, x"
//   POST /hello-ts/count      -> increments "hits" in bucket "default"
//   GET  /hello-ts/greeting   -> the `greeting` config value
//   POST /hello-ts/publish    -> publishes the body on topic "orders"
//
// The Runtime ABI comes in as ES modules named after its WIT interfaces;
// their types are in types/, written from wit/ by `jco guest-types`
// (`npm run types`, part of the build). A refused call throws (its
// `payload` is the ABI's error value).

import { open } from "wasi:keyvalue/store@0.2.0-draft";
import { increment } from "wasi:keyvalue/atomics@0.2.0-draft";
import { get as configGet } from "wasi:config/store@0.2.0-rc.1";
import { publish } from "shoal:runtime/pubsub@0.1.0";

addEventListener("fetch", ((event: FetchEvent) => event.respondWith(handle(event.request))) as EventListener);

async function handle(request: Request): Promise<Response> {
  const url = new URL(request.url);
  const action = url.pathname.split("/").pop();
  try {
    if (action === "count" && request.method === "POST") {
      const hits: bigint = increment(open("default"), "hits", 1n);
      return new Response(`${hits}\n`);
    }
    if (action === "greeting") {
      const greeting: string | undefined = configGet("greeting");
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
    // An ABI refusal: say which, as the other examples do.
    return new Response(`refused: ${describe(error)}\n`, { status: 403 });
  }
}

/** An ABI error value (a WIT variant: `tag`, and `val` when it carries one). */
interface Variant {
  tag: string;
  val?: unknown;
}

function describe(error: unknown): string {
  const value = (error as { payload?: unknown } | undefined)?.payload ?? error;
  if (value !== null && typeof value === "object" && "tag" in value) {
    const variant = value as Variant;
    return variant.val === undefined ? variant.tag : `${variant.tag}: ${String(variant.val)}`;
  }
  return String(value);
}
