//! Containers whose wasm is a program, not a function: a component
//! exporting `wasi:cli/run`, or a classic `wasm32-wasip1` module with
//! `_start` (images made for other wasm runtimes). It runs once, like a
//! process: args and environment from the spec, the rootfs as a read-only
//! `/`, output to the container's FIFOs, and its exit code is the task's.
//!
//! A `wasm32-wasip1` module is made a component first, with wasmtime's
//! WASI 0.1 adapter (what `cargo component` and `wasm-tools component
//! new` do), so every program reaches files through the one
//! `wasi:filesystem` Shoal limits to ordinary files
//! ([`shoal::files`]): wasmtime's own WASI 0.1 would open whatever a path
//! names.
//!
//! A component exporting `wasi:cli/run@0.3` (a WASI 0.3 program, e.g.
//! built with the `wasip3` bindings) runs on the engine with the component
//! model's concurrency, its `run` driven as a task of its store; it gets
//! WASI 0.3's cli, clocks, filesystem, random and sockets beside WASI 0.2;
//! its files, through either version's `wasi:filesystem`, are limited to
//! ordinary files the same way ([`shoal::files`]).
//!
//! Commands get WASI only, not the Runtime ABI: a program that needs state
//! or messages is written as a function.

use std::path::Path;
use std::sync::Arc;

use wasmtime::component::{Component, Linker as ComponentLinker, ResourceTable};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::cli::{AsyncStdinStream, AsyncStdoutStream};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::error::{Code, NodeError};
use shoal::engine::WasmEngine;
use shoal::limits::{CpuQuota, CpuTimed};
use shoal::logs::{InstanceLog, Stream};

/// The exit status of a command that trapped (as a process that aborted:
/// 128 + SIGABRT).
pub(crate) const TRAPPED: i32 = 134;

/// A compiled program (a `wasi:cli/run` component), ready to run.
#[derive(Clone)]
pub(crate) enum Program {
    /// `wasi:cli/run@0.2` (or a WASI 0.1 module, adapted).
    P2(CommandPre<CommandState>),
    /// `wasi:cli/run@0.3`: instantiated, then run as a task of its store.
    P3 {
        pre: wasmtime::component::InstancePre<CommandState>,
        indices: Arc<wasmtime_wasi::p3::bindings::CommandIndices>,
    },
}

/// Store data of a component command.
pub(crate) struct CommandState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for CommandState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// What the program is run with.
pub(crate) struct Invocation<'a> {
    /// `argv`, `args[0]` being the program's path.
    pub args: &'a [String],
    /// The environment.
    pub env: &'a [(String, String)],
    /// Mounted read-only at `/`, when present.
    pub rootfs: Option<&'a Path>,
    /// The container's volumes, preopened at their mount paths.
    pub volumes: &'a [shoal::manifest::FileGrant],
    /// Linear memory cap in bytes.
    pub memory_limit: Option<u64>,
    /// The container's CPU share (its `cpu_millis`), shared with its
    /// function and its other execs: past it the program waits for the
    /// next period, as the function's calls do.
    pub cpu_quota: Option<Arc<CpuQuota>>,
    /// Where its input comes from and its output goes.
    pub stdio: Stdio,
    /// Whose it is (a pod's namespace): its instance counts against the
    /// tenant's busy instances, as a function's does.
    pub tenant: &'a str,
}

/// A program's standard streams.
pub(crate) enum Stdio {
    /// The container's: no input, output lines to its log (budgeted).
    Log(Arc<InstanceLog>),
    /// An exec's own FIFOs, byte for byte.
    Pipes { stdin: Option<AsyncStdinStream>, stdout: AsyncStdoutStream, stderr: AsyncStdoutStream },
}

/// Whether `wasm` is a program (rather than a function component): a core
/// module, or a component that exports `wasi:cli/run` and not the HTTP
/// handler. Read from the component's own export section, without
/// compiling it (a compile here cost every pod start ≈100 ms; the host's
/// cached compile follows for functions, and `compile` for programs).
pub(crate) fn is_program(wasm: &[u8]) -> bool {
    if wasmparser::Parser::is_core_wasm(wasm) {
        return true;
    }
    let Ok(names) = component_exports(wasm) else { return false };
    let exports = |prefix: &str| names.iter().any(|name| name.starts_with(prefix));
    exports("wasi:cli/run@") && !exports("wasi:http/incoming-handler@") && !exports("wasi:http/handler@")
}

/// The names a component exports at its top level (nested modules and
/// components each open with a header of their own and close with an end).
fn component_exports(wasm: &[u8]) -> Result<Vec<String>, wasmparser::BinaryReaderError> {
    use wasmparser::{Parser, Payload};
    let mut depth = 0usize;
    let mut names = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload? {
            Payload::Version { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentExportSection(exports) if depth == 1 => {
                for export in exports {
                    names.push(export?.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(names)
}

pub(crate) fn compile(engine: &WasmEngine, wasm: &[u8]) -> Result<Program, NodeError> {
    let invalid = |what: &str| {
        let what = what.to_string();
        move |err: wasmtime::Error| NodeError::Wasm { code: Code::INVALID_ARGUMENT, what, source: err.into() }
    };
    let adapted;
    let wasm = if wasmparser::Parser::is_core_wasm(wasm) {
        adapted = adapt(wasm)?;
        &adapted
    } else {
        wasm
    };
    let wasi_0_3 = shoal::function::uses_wasi_0_3(wasm).unwrap_or(false);
    let flavor = shoal::engine::Flavor { fuel: false, concurrent: wasi_0_3 };
    let wasmtime_engine = engine.engine_for(flavor).map_err(|err| NodeError::Wasm {
        code: Code::INTERNAL,
        what: "cannot build the engine for WASI 0.3 programs".to_string(),
        source: err,
    })?;
    let component = Component::new(wasmtime_engine, wasm).map_err(invalid("invalid component"))?;
    let mut linker: ComponentLinker<CommandState> = ComponentLinker::new(wasmtime_engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .and_then(|()| shoal::files::add_to_linker(&mut linker))
        .and_then(|()| link_exit_code(&mut linker))
        .map_err(|err| NodeError::Wasm {
            code: Code::INTERNAL,
            what: "cannot link WASI 0.2".to_string(),
            source: err.into(),
        })?;
    if wasi_0_3 {
        // Not `p3::add_to_linker`: its filesystem opens whatever a path
        // names; Shoal's checks each open (as 0.2's, above).
        wasmtime_wasi::p3::cli::add_to_linker(&mut linker)
            .and_then(|()| wasmtime_wasi::p3::clocks::add_to_linker(&mut linker))
            .and_then(|()| shoal::files::add_p3_to_linker(&mut linker))
            .and_then(|()| wasmtime_wasi::p3::random::add_to_linker(&mut linker))
            .and_then(|()| wasmtime_wasi::p3::sockets::add_to_linker(&mut linker))
            .map_err(|err| NodeError::Wasm {
                code: Code::INTERNAL,
                what: "cannot link WASI 0.3".to_string(),
                source: err.into(),
            })?;
    }
    let pre = linker.instantiate_pre(&component).map_err(invalid("cannot link the component"))?;
    if wasi_0_3 {
        let indices = wasmtime_wasi::p3::bindings::CommandIndices::new(&pre)
            .map_err(invalid("the component exports no wasi:cli/run@0.3"))?;
        return Ok(Program::P3 { pre, indices: Arc::new(indices) });
    }
    let pre = CommandPre::new(pre).map_err(invalid("the component exports no wasi:cli/run"))?;
    Ok(Program::P2(pre))
}

/// A WASI 0.1 command module as a `wasi:cli/run` component (its `_start`
/// is the `run` export; its imports go through wasmtime's adapter).
///
/// The adapter reports every non-zero `proc_exit` as plain failure (1),
/// while a process's exit code is what containerd and `kubectl` show. So
/// the module's `proc_exit` import is renamed, before the adapter sees it,
/// to [`EXIT_INTERFACE`]'s `exit`, a component import the host answers
/// with the code itself ([`link_exit_code`]).
fn adapt(module: &[u8]) -> Result<Vec<u8>, NodeError> {
    use wasi_preview1_component_adapter_provider::{
        WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
    };
    let invalid = |err: anyhow::Error| NodeError::Wasm {
        code: Code::INVALID_ARGUMENT,
        what: "invalid wasm module (as a WASI 0.1 command)".to_string(),
        source: err,
    };
    let exports_start = wasmparser::Parser::new(0).parse_all(module).any(|payload| match payload {
        Ok(wasmparser::Payload::ExportSection(exports)) => {
            exports.into_iter().any(|export| export.is_ok_and(|export| export.name == "_start"))
        }
        _ => false,
    });
    if !exports_start {
        return Err(NodeError::InvalidArgument("the module exports no `_start`: it is not a WASI command".to_string()));
    }
    let mut module = rename_proc_exit(module).map_err(invalid)?;
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve.push_str("shoal-program-exit.wit", EXIT_WIT).map_err(invalid)?;
    let world = resolve.select_world(&[package], Some("program")).map_err(invalid)?;
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8)
        .map_err(invalid)?;
    wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|encoder| {
            encoder.adapter(WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER)
        })
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(invalid)
}

/// The interface a WASI 0.1 program's `proc_exit` is imported from once
/// adapted; it is Shoal's own, answered only for programs.
const EXIT_INTERFACE: &str = "shoal:program/exit@0.1.0";

/// Its WIT: `exit` ends the program with `code` as its status.
const EXIT_WIT: &str = "package shoal:program@0.1.0;
interface exit { exit: func(code: u32); }
world program { import exit; }
";

/// `module` with its `wasi_snapshot_preview1.proc_exit` import taken from
/// [`EXIT_INTERFACE`] instead (same signature: one `i32`).
fn rename_proc_exit(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    use wasm_encoder::reencode::{Error, Reencode, RoundtripReencoder};

    struct Renamer;
    impl Reencode for Renamer {
        type Error = std::convert::Infallible;

        fn parse_import_section(
            &mut self,
            imports: &mut wasm_encoder::ImportSection,
            section: wasmparser::ImportSectionReader<'_>,
        ) -> Result<(), Error<Self::Error>> {
            for import in section.into_imports() {
                let import = import?;
                let (module, name) = match (import.module, import.name) {
                    ("wasi_snapshot_preview1", "proc_exit") => (EXIT_INTERFACE, "exit"),
                    other => other,
                };
                imports.import(module, name, RoundtripReencoder.entity_type(import.ty)?);
            }
            Ok(())
        }
    }

    let mut encoded = wasm_encoder::Module::new();
    Renamer.parse_core_module(&mut encoded, wasmparser::Parser::new(0), module)?;
    Ok(encoded.finish())
}

/// Answer [`EXIT_INTERFACE`] for an adapted WASI 0.1 program: its exit
/// code ends it, as `proc_exit` would.
fn link_exit_code(linker: &mut ComponentLinker<CommandState>) -> wasmtime::Result<()> {
    linker.instance(EXIT_INTERFACE)?.func_wrap("exit", |_, (code,): (u32,)| -> wasmtime::Result<()> {
        Err(I32Exit(i32::try_from(code).unwrap_or(i32::MAX)).into())
    })
}

/// How long a program waits for an instance slot when every one is busy.
const PROGRAM_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Run the program to its end; returns its exit status, and why it
/// trapped if it did.
pub(crate) async fn run(engine: &WasmEngine, program: &Program, invocation: Invocation<'_>) -> (i32, Option<String>) {
    // A program's instance takes one of the engine's slots like a
    // function's (an idle function instance gives its slot up if need
    // be), and counts against its tenant's busy instances.
    let deadline = tokio::time::Instant::now() + PROGRAM_SLOT_WAIT;
    let allowance = engine.slots().tenant(invocation.tenant);
    let Ok(Ok(_busy)) = tokio::time::timeout_at(deadline, allowance.acquire_owned()).await else {
        let why = format!(
            "namespace {:?} kept all {} of its busy instances for {PROGRAM_SLOT_WAIT:?}",
            invocation.tenant,
            engine.slots().per_tenant()
        );
        return (TRAPPED, Some(why));
    };
    let Some(_slot) = engine.slots().acquire(deadline).await else {
        let why = format!("no instance slot of the host's engine became free within {PROGRAM_SLOT_WAIT:?}");
        return (TRAPPED, Some(why));
    };
    // The program may run wasm at any time until it ends: keep the clock on.
    let _clock = engine.hold_clock();
    let memory_limit = invocation.memory_limit;
    let quota = invocation.cpu_quota.clone();
    let result = match build_context(invocation) {
        Err(err) => Err(err),
        Ok(mut builder) => {
            let state =
                CommandState { wasi: builder.build(), table: ResourceTable::new(), limits: limits(memory_limit) };
            let mut store = store(program.engine(), state, quota.clone());
            let run = async {
                match program {
                    Program::P2(pre) => {
                        let command = pre.instantiate_async(&mut store).await?;
                        command.wasi_cli_run().call_run(&mut store).await
                    }
                    Program::P3 { pre, indices } => {
                        let instance = pre.instantiate_async(&mut store).await?;
                        let command = indices.load(&mut store, &instance)?;
                        store
                            .run_concurrent(async move |accessor| command.wasi_cli_run().call_run(accessor).await)
                            .await?
                    }
                }
            };
            match CpuTimed::new(run, quota).await {
                Ok(Ok(())) => Ok(0),
                Ok(Err(())) => Ok(1),
                Err(err) => Err(err),
            }
        }
    };
    // The store (and so the guest's stdio) is dropped by now: trailing
    // partial lines are already written.
    match result {
        Ok(code) => (code, None),
        Err(err) => match err.downcast_ref::<I32Exit>() {
            Some(exit) => (exit.0, None),
            None => (TRAPPED, Some(format!("{err:#}"))),
        },
    }
}

fn build_context(invocation: Invocation<'_>) -> wasmtime::Result<WasiCtxBuilder> {
    let mut builder = WasiCtxBuilder::new();
    builder.args(invocation.args).envs(invocation.env).allow_tcp(false).allow_udp(false);
    match invocation.stdio {
        Stdio::Log(log) => {
            builder.stdout(log.output(Stream::Stdout)).stderr(log.output(Stream::Stderr));
        }
        Stdio::Pipes { stdin, stdout, stderr } => {
            builder.stdout(stdout).stderr(stderr);
            if let Some(stdin) = stdin {
                builder.stdin(stdin);
            }
        }
    }
    if let Some(rootfs) = invocation.rootfs.filter(|rootfs| rootfs.is_dir()) {
        builder.preopened_dir(rootfs, "/", FsPerms::ReadOnly)?;
    }
    for volume in invocation.volumes {
        let perms = if volume.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
        builder.preopened_dir(&volume.host, &volume.guest, perms)?;
    }
    Ok(builder)
}

fn limits(memory_limit: Option<u64>) -> StoreLimits {
    let mut limits = StoreLimitsBuilder::new();
    if let Some(bytes) = memory_limit {
        limits = limits.memory_size(usize::try_from(bytes).unwrap_or(usize::MAX));
    }
    limits.build()
}

impl Program {
    /// The wasmtime engine its code is for.
    fn engine(&self) -> &wasmtime::Engine {
        match self {
            Program::P2(pre) => pre.instance_pre().engine(),
            Program::P3 { pre, .. } => pre.engine(),
        }
    }
}

fn store(engine: &wasmtime::Engine, state: CommandState, quota: Option<Arc<CpuQuota>>) -> Store<CommandState> {
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limits);
    // A program runs as long as it likes, but yields at every epoch tick
    // so it never holds a host thread, and can be stopped by dropping it.
    // Over its container's CPU share it waits for the next period instead.
    match quota {
        None => store.epoch_deadline_async_yield_and_update(1),
        Some(quota) => {
            store.epoch_deadline_callback(move |_| {
                Ok(match quota.throttle(std::time::Instant::now(), None) {
                    Some(until) => UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep_until(until.into()))),
                    None => UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())),
                })
            });
            store.set_epoch_deadline(1);
        }
    }
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component exporting `names`, each an instance holding one
    /// function (enough for the export section; nothing is compiled).
    fn component(names: &[&str]) -> Vec<u8> {
        let exports: String = names.iter().map(|name| format!("(export \"{name}\" (instance $i))\n")).collect();
        let text = format!(
            "(component
               (core module $m (func (export \"f\")))
               (core instance $c (instantiate $m))
               (func $f (canon lift (core func $c \"f\")))
               (instance $i (export \"run\" (func $f)))
               {exports})"
        );
        wat::parse_str(text).unwrap()
    }

    #[test]
    fn a_program_is_told_from_a_function_by_its_exports_alone() {
        assert!(is_program(&component(&["wasi:cli/run@0.2.0"])));
        assert!(!is_program(&component(&["wasi:cli/run@0.2.0", "wasi:http/incoming-handler@0.2.0"])));
        assert!(!is_program(&component(&["wasi:http/incoming-handler@0.2.6"])));
        assert!(!is_program(&component(&[])));
        assert!(is_program(&component(&["wasi:cli/run@0.3.0"])), "a WASI 0.3 program");
        assert!(!is_program(&component(&["wasi:cli/run@0.3.0", "wasi:http/handler@0.3.0"])));
        assert!(is_program(&wat::parse_str("(module (func (export \"_start\")))").unwrap()), "a core module");
        assert!(!is_program(b"\0asm\x0d\0\x01\0 not a component"), "garbage is no program");
    }
}
