module hello-go

go 1.25

// What wit-bindgen 0.57's Go bindings import (their runtime support and
// the Result/Option types): go.bytecodealliance.org/pkg v0.2.1. There is
// no Go module proxy to fetch it from: the wit-bindgen-go crate (crates.io)
// ships this very release, and the Makefile copies it from there.
require go.bytecodealliance.org/pkg v0.2.1

replace go.bytecodealliance.org/pkg => ../target/tools/go-pkg-v0.2.1
