// hello-go: a Shoal HTTP function in Go, built by stock Go (GOOS=wasip1
// GOARCH=wasm, -buildmode=c-shared) with bindings from wit-bindgen's Go
// generator, made a WASI 0.2 component with the WASI preview1 reactor
// adapter. See Makefile; the handler is in export_wasi_http_incoming_handler.
package main

// The generated exports: wasi:http/incoming-handler#handle, which calls
// export_wasi_http_incoming_handler.Handle.
import _ "hello-go/gen/wit_exports"

// Unused (the module is a reactor), but package main needs it.
func main() {}
