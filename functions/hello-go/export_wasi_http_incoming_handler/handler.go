// Package export_wasi_http_incoming_handler is the function's export
// wasi:http/incoming-handler (wit-bindgen's Go generator names the package
// and calls its Handle):
//
//	GET  /hello-go?name=x     -> "hello, x"
//	POST /hello-go/count      -> increments "hits" in bucket "default"
//	GET  /hello-go/greeting   -> the `greeting` config value
//	POST /hello-go/publish    -> publishes the body on topic "orders"
package export_wasi_http_incoming_handler

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strings"

	"hello-go/gen/shoal_runtime_pubsub"
	"hello-go/gen/shoal_runtime_types"
	"hello-go/gen/wasi_config_store"
	"hello-go/gen/wasi_http_types"
	"hello-go/gen/wasi_keyvalue_atomics"
	"hello-go/gen/wasi_keyvalue_store"

	witRuntime "go.bytecodealliance.org/pkg/wit/runtime"
	witTypes "go.bytecodealliance.org/pkg/wit/types"
)

// The collector runs only between requests, never by itself. The host
// copies strings and lists into the guest through cabi_realloc, during
// which the component model forbids calling any import; Go's allocator
// may start or assist a collection there, and a collection reads the
// clock (an import, through the preview1 adapter): that trapped about
// one request in 10,000 with "cannot leave component instance".
func init() {
	debug.SetGCPercent(-1)
}

// heapObjects is the runtime metric of live and unswept heap bytes.
var heapObjects = []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}

// afterCollection is the heap size the last collection left.
var afterCollection uint64

// served counts requests, to read the heap size every 16th.
var served uint64

// collectGarbage runs after each request (where imports are allowed): it
// lets go of the request's pinned allocations and, every 16 requests,
// collects if the heap has grown 4 MiB since the last collection (a
// request reads at most 256 KiB of body, so the heap grows by a few MiB
// between two looks at most).
func collectGarbage() {
	witRuntime.Unpin()
	served++
	if served%16 != 0 {
		return
	}
	metrics.Read(heapObjects)
	if heapObjects[0].Value.Kind() != metrics.KindUint64 {
		runtime.GC()
		return
	}
	if heap := heapObjects[0].Value.Uint64(); heap > afterCollection+4<<20 {
		runtime.GC()
		metrics.Read(heapObjects)
		afterCollection = heapObjects[0].Value.Uint64()
	}
}

// The most of a request body this function reads.
const maxBody = 256 * 1024

// blocking-write-and-flush takes at most 4096 bytes a call.
const writeChunk = 4096

// Handle answers one request; the host calls it through the generated export.
func Handle(request *wasi_http_types.IncomingRequest, out *wasi_http_types.ResponseOutparam) {
	target := request.PathWithQuery().SomeOr("/")
	path, query, _ := strings.Cut(target, "?")
	action := path[strings.LastIndexByte(path, '/')+1:]
	post := request.Method().Tag() == wasi_http_types.MethodPost

	status, text := uint16(200), ""
	switch {
	case post && action == "count":
		status, text = count()
	case action == "greeting":
		status, text = greeting()
	case post && action == "publish":
		status, text = publish(readBody(request))
	default:
		name, found := queryParam(query, "name")
		if !found {
			name = "world"
		}
		text = "hello, " + name + "\n"
	}
	request.Drop()
	respond(out, status, text)
	collectGarbage()
}

// count increments "hits" in bucket "default".
func count() (uint16, string) {
	opened := wasi_keyvalue_store.Open("default")
	if opened.IsErr() {
		return 403, "refused: " + kvError(opened.Err()) + "\n"
	}
	bucket := opened.Ok()
	defer bucket.Drop()
	hits := wasi_keyvalue_atomics.Increment(bucket, "hits", 1)
	if hits.IsErr() {
		return 403, "refused: " + kvError(hits.Err()) + "\n"
	}
	return 200, fmt.Sprintf("%d\n", hits.Ok())
}

func kvError(err wasi_keyvalue_store.Error) string {
	switch err.Tag() {
	case wasi_keyvalue_store.ErrorNoSuchStore:
		return "no-such-store"
	case wasi_keyvalue_store.ErrorAccessDenied:
		return "access-denied"
	default:
		return "other"
	}
}

// greeting reads the `greeting` config value.
func greeting() (uint16, string) {
	value := wasi_config_store.Get("greeting")
	if value.IsErr() {
		err := value.Err()
		why := ""
		if err.Tag() == wasi_config_store.ErrorUpstream {
			why = err.Upstream()
		} else {
			why = err.Io()
		}
		return 403, "refused: " + why + "\n"
	}
	if value.Ok().IsNone() {
		return 404, "no greeting configured\n"
	}
	return 200, value.Ok().Some() + "\n"
}

// publish queues `message` on topic "orders".
func publish(message []byte) (uint16, string) {
	published := shoal_runtime_pubsub.Publish("orders", message)
	if published.IsOk() {
		return 202, "published\n"
	}
	err := published.Err()
	var kind, why string
	switch err.Tag() {
	case shoal_runtime_types.ErrorDenied:
		kind, why = "denied", err.Denied()
	case shoal_runtime_types.ErrorLimited:
		kind, why = "limited", err.Limited()
	case shoal_runtime_types.ErrorNotFound:
		kind, why = "not-found", err.NotFound()
	default:
		kind, why = "backend", err.Backend()
	}
	return 403, "refused: " + kind + ": " + why + "\n"
}

// readBody reads up to maxBody bytes of the request body.
func readBody(request *wasi_http_types.IncomingRequest) []byte {
	consumed := request.Consume()
	if consumed.IsErr() {
		return nil
	}
	body := consumed.Ok()
	defer body.Drop()
	stream := body.Stream()
	if stream.IsErr() {
		return nil
	}
	input := stream.Ok()
	defer input.Drop() // before the body: a child resource goes first
	var data []byte
	for len(data) < maxBody {
		chunk := input.BlockingRead(uint64(maxBody - len(data)))
		if chunk.IsErr() {
			break // closed (the end) or failed
		}
		data = append(data, chunk.Ok()...)
	}
	return data
}

// queryParam is the value of `key` in `query` (not decoded), if there.
func queryParam(query, key string) (string, bool) {
	for _, pair := range strings.Split(query, "&") {
		if value, found := strings.CutPrefix(pair, key+"="); found {
			return value, true
		}
	}
	return "", false
}

// respond sends `status` and `text` as a text/plain response.
func respond(out *wasi_http_types.ResponseOutparam, status uint16, text string) {
	headers := wasi_http_types.MakeFields()
	headers.Append("content-type", []byte("text/plain; charset=utf-8"))
	response := wasi_http_types.MakeOutgoingResponse(headers)
	response.SetStatusCode(status)
	body := response.Body().Ok()
	wasi_http_types.ResponseOutparamSet(out, witTypes.Ok[*wasi_http_types.OutgoingResponse, wasi_http_types.ErrorCode](response))

	if stream := body.Write(); stream.IsOk() {
		output := stream.Ok()
		for data := []byte(text); len(data) > 0; {
			n := min(len(data), writeChunk)
			if output.BlockingWriteAndFlush(data[:n]).IsErr() {
				break
			}
			data = data[n:]
		}
		output.Drop() // before finishing the body
	}
	wasi_http_types.OutgoingBodyFinish(body, witTypes.None[*wasi_http_types.Fields]())
}
