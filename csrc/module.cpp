// pybind11 wiring only: argument conversion, GIL handling and error mapping. Logic lives in the
// plain C++ files next to this one.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "checksum.hpp"
#include "cuda_host.hpp"
#include "errors.hpp"
#include "net.hpp"
#include "staging.hpp"
#include "stream.hpp"
#include "wire.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

// Lets Ctrl-C interrupt a wait running without the GIL: the wait calls this between slices.
void check_python_signals() {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

const ww::InterruptCheck kInterrupt = check_python_signals;

// A Py_buffer held for the length of one call; holding it keeps the exporter's memory in place,
// which is what makes releasing the GIL around a copy safe.
class HeldBuffer {
public:
    HeldBuffer(py::handle obj, int flags, const char* role) {
        if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
            // Keep the exporter's own exception type (ValueError for a closed HostBuffer, ...).
            py::error_already_set err;
            PyErr_Format(err.type().ptr(), "%s: %S", role, err.value().ptr());
            throw py::error_already_set();
        }
    }
    ~HeldBuffer() { PyBuffer_Release(&view_); }
    HeldBuffer(const HeldBuffer&) = delete;
    HeldBuffer& operator=(const HeldBuffer&) = delete;
    char* data() const { return static_cast<char*>(view_.buf); }
    std::size_t size() const { return static_cast<std::size_t>(view_.len); }

private:
    Py_buffer view_{};
};

std::size_t non_negative(long long value, const char* name) {
    if (value < 0) throw std::invalid_argument(std::string(name) + " must be >= 0, got " + std::to_string(value));
    return static_cast<std::size_t>(value);
}

std::size_t copy_into(py::handle dst, long long dst_offset, py::handle src, long long threads) {
    const std::size_t offset = non_negative(dst_offset, "dst_offset");
    const std::size_t nthreads = non_negative(threads, "threads");
    HeldBuffer out(dst, PyBUF_SIMPLE | PyBUF_WRITABLE, "dst");
    HeldBuffer in(src, PyBUF_SIMPLE, "src");
    if (offset > out.size() || in.size() > out.size() - offset) {
        throw std::invalid_argument("copy of " + std::to_string(in.size()) + " bytes at offset " +
                                    std::to_string(offset) + " does not fit a destination of " +
                                    std::to_string(out.size()) + " bytes");
    }
    char* to = out.data() + offset;
    const char* from = in.data();
    const bool overlap = to < from + in.size() && from < to + in.size();
    // Safe without the GIL: both buffers stay exported (pinned in place) until this returns.
    py::gil_scoped_release nogil;
    if (overlap) {
        std::memmove(to, from, in.size());
    } else {
        const std::size_t capped = std::min<std::size_t>(nthreads, 64);  // no truncation to 0
        ww::parallel_copy(to, from, in.size(),
                          capped == 0 ? ww::default_copy_threads() : static_cast<unsigned>(capped));
    }
    return in.size();
}

// The C++ object behind `self`. pybind11 (3.1) hands methods raw, unconstructed storage for an
// instance made with cls.__new__(cls) and never initialised (pybind/pybind11#6153); every
// binding goes through here so such an instance raises TypeError instead of crashing.
template <typename T>
T& native(py::handle self) {
    auto* inst = reinterpret_cast<py::detail::instance*>(self.ptr());
    const py::detail::type_info* info = py::detail::get_type_info(typeid(T));
    if (info == nullptr) throw std::logic_error("native type is not registered");
    if (!PyObject_TypeCheck(self.ptr(), info->type)) {
        throw py::type_error(std::string("expected a ") + info->type->tp_name);
    }
    py::detail::value_and_holder vh = inst->get_value_and_holder(info, false);
    if (!vh || !vh.holder_constructed()) {
        throw py::type_error(std::string(info->type->tp_name) +
                             " was created without calling its constructor");
    }
    return *vh.value_ptr<T>();
}

ww::HostBuffer& buffer(py::handle self) { return native<ww::HostBuffer>(self); }

// A binding for an argument-free method of T, reached through the native<T> check.
template <typename T, auto Method>
auto checked_method() {
    return [](py::handle self) { return (native<T>(self).*Method)(); };
}

// Buffer protocol for HostBuffer, written by hand (not pybind11's def_buffer) so every export is
// counted: close() refuses while views are alive, and StagingPool never reuses a viewed buffer.
int host_buffer_getbuffer(PyObject* obj, Py_buffer* view, int flags) {
    view->obj = nullptr;
    ww::HostBuffer* buf = nullptr;
    try {
        buf = &buffer(obj);
    } catch (py::error_already_set& e) {
        e.restore();
        return -1;
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_TypeError, e.what());
        return -1;
    }
    if (buf->closed()) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed HostBuffer");
        return -1;
    }
    if (PyBuffer_FillInfo(view, obj, buf->data(), static_cast<Py_ssize_t>(buf->size()), 0, flags) != 0) {
        return -1;
    }
    buf->add_export();
    return 0;
}

void host_buffer_releasebuffer(PyObject* obj, Py_buffer*) {
    // Only reached for views getbuffer handed out, so the instance is initialised.
    try {
        buffer(obj).remove_export();
    } catch (...) {
        PyErr_Clear();
    }
}

py::tuple accepted_tuple(const ww::Accepted& a) {
    ww::UniqueFd owned(a.fd);  // closed if building the tuple fails
    py::tuple out = py::make_tuple(a.fd, a.peer.family, a.peer.host, a.peer.port);
    owned.release();
    return out;
}

ww::ChunkPlan& plan_of(py::handle self) { return native<ww::ChunkPlan>(self); }

const ww::Chunk& chunk_at(const ww::ChunkPlan& plan, long long index) {
    if (index < 0 || static_cast<std::size_t>(index) >= plan.chunks().size()) {
        throw std::invalid_argument("chunk " + std::to_string(index) + " does not exist (the plan has " +
                                    std::to_string(plan.chunks().size()) + ")");
    }
    return plan.chunks()[static_cast<std::size_t>(index)];
}

void require_size(const HeldBuffer& buf, std::uint64_t nbytes, const char* role) {
    if (buf.size() < nbytes) {
        throw std::invalid_argument(std::string(role) + " holds " + std::to_string(buf.size()) + " bytes; the plan needs " +
                                    std::to_string(nbytes));
    }
}

unsigned thread_count(long long threads) {
    const std::size_t n = std::min<std::size_t>(non_negative(threads, "threads"), 64);
    return n == 0 ? ww::default_copy_threads() : static_cast<unsigned>(n);
}

void bind_transport(py::module_& m) {
    py::class_<ww::ChunkPlan>(m, "ChunkPlan")
        .def(py::init<const std::vector<std::uint64_t>&, std::uint64_t>(), "leaf_nbytes"_a, "chunk_bytes"_a)
        .def_property_readonly("total_bytes", [](py::handle self) { return plan_of(self).total_bytes(); })
        .def_property_readonly("chunk_bytes", [](py::handle self) { return plan_of(self).chunk_bytes(); })
        .def_property_readonly("leaf_offsets", [](py::handle self) { return plan_of(self).leaf_offsets(); })
        .def_property_readonly("num_chunks", [](py::handle self) { return plan_of(self).chunks().size(); })
        .def_property("crcs", [](py::handle self) { return plan_of(self).crcs(); },
                      [](py::handle self, const std::vector<std::uint32_t>& crcs) { plan_of(self).set_crcs(crcs); });

    m.def(
        "stage_leaf",
        [](py::handle plan_obj, py::handle dst, long long leaf, py::handle src, long long threads) {
            ww::ChunkPlan& plan = plan_of(plan_obj);
            if (leaf < 0 || static_cast<std::size_t>(leaf) >= plan.leaf_nbytes().size()) {
                throw std::invalid_argument("leaf " + std::to_string(leaf) + " does not exist");
            }
            HeldBuffer out(dst, PyBUF_SIMPLE | PyBUF_WRITABLE, "dst");
            HeldBuffer in(src, PyBUF_SIMPLE, "src");
            require_size(out, plan.total_bytes(), "dst");
            if (in.size() != plan.leaf_nbytes()[static_cast<std::size_t>(leaf)]) {
                throw std::invalid_argument("src holds " + std::to_string(in.size()) + " bytes; leaf " +
                                            std::to_string(leaf) + " has " +
                                            std::to_string(plan.leaf_nbytes()[static_cast<std::size_t>(leaf)]));
            }
            const unsigned n = thread_count(threads);
            // Safe without the GIL: both buffers stay exported until this returns; the plan is
            // only written by its owner, which is this call.
            py::gil_scoped_release nogil;
            ww::stage_leaf(out.data(), in.data(), plan, static_cast<std::uint32_t>(leaf), n);
        },
        "plan"_a, "dst"_a, "leaf"_a, "src"_a, "threads"_a = 0);
    m.def(
        "read_verified",
        [](int fd, py::handle plan_obj, py::handle dst, long long threads) {
            const ww::ChunkPlan& plan = plan_of(plan_obj);
            HeldBuffer out(dst, PyBUF_SIMPLE | PyBUF_WRITABLE, "dst");
            require_size(out, plan.total_bytes(), "dst");
            const unsigned n = thread_count(threads);
            // Safe without the GIL: the buffer stays exported and the plan is read-only.
            py::gil_scoped_release nogil;
            ww::read_verified(fd, out.data(), plan, n);
        },
        "fd"_a, "plan"_a, "dst"_a, "threads"_a = 0);
    m.def(
        "send_stripe",
        [](int fd, py::handle plan_obj, py::handle src, unsigned stream, unsigned streams, std::uint64_t epoch,
           std::uint64_t weight_id, double timeout_s, long long corrupt_chunk, long long cut_after_bytes,
           long long stall_after_bytes) {
            const ww::ChunkPlan& plan = plan_of(plan_obj);
            HeldBuffer in(src, PyBUF_SIMPLE, "src");
            require_size(in, plan.total_bytes(), "src");
            // Safe without the GIL: the buffer stays exported and the plan is read-only once staged.
            py::gil_scoped_release nogil;
            ww::send_stripe(fd, in.data(), plan, stream, streams, ww::FrameTag{epoch, weight_id}, timeout_s,
                            ww::SendFaults{corrupt_chunk, cut_after_bytes, stall_after_bytes}, kInterrupt);
        },
        "fd"_a, "plan"_a, "src"_a, "stream"_a, "streams"_a, "epoch_tag"_a, "weight_id"_a, "timeout_s"_a,
        py::kw_only(), "corrupt_chunk"_a = -1, "cut_after_bytes"_a = -1, "stall_after_bytes"_a = -1);
    m.def(
        "recv_stripe",
        [](int fd, py::handle plan_obj, py::handle dst, unsigned stream, unsigned streams, std::uint64_t epoch,
           std::uint64_t weight_id, double timeout_s) {
            const ww::ChunkPlan& plan = plan_of(plan_obj);
            HeldBuffer out(dst, PyBUF_SIMPLE | PyBUF_WRITABLE, "dst");
            require_size(out, plan.total_bytes(), "dst");
            // Safe without the GIL: the buffer stays exported and the plan is read-only.
            py::gil_scoped_release nogil;
            ww::recv_stripe(fd, out.data(), plan, stream, streams, ww::FrameTag{epoch, weight_id}, timeout_s,
                            kInterrupt);
        },
        "fd"_a, "plan"_a, "dst"_a, "stream"_a, "streams"_a, "epoch_tag"_a, "weight_id"_a, "timeout_s"_a);
    m.def(
        "encode_frame_header",
        [](py::handle plan_obj, long long chunk, std::uint64_t epoch, std::uint64_t weight_id) {
            unsigned char out[ww::kFrameHeaderSize];
            ww::encode_frame_header(ww::FrameTag{epoch, weight_id}, chunk_at(plan_of(plan_obj), chunk), out);
            return py::bytes(reinterpret_cast<const char*>(out), sizeof out);
        },
        "plan"_a, "chunk"_a, "epoch_tag"_a, "weight_id"_a);
    m.def(
        "check_frame_header",
        [](py::handle plan_obj, long long chunk, py::handle header, std::uint64_t epoch, std::uint64_t weight_id) {
            const ww::Chunk& expected = chunk_at(plan_of(plan_obj), chunk);
            HeldBuffer in(header, PyBUF_SIMPLE, "header");
            ww::check_frame_header(reinterpret_cast<const unsigned char*>(in.data()), in.size(),
                                   ww::FrameTag{epoch, weight_id}, expected);
        },
        "plan"_a, "chunk"_a, "header"_a, "epoch_tag"_a, "weight_id"_a);
    m.attr("FRAME_HEADER_SIZE") = ww::kFrameHeaderSize;
    m.attr("LEAF_ALIGNMENT") = ww::kLeafAlignment;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "weightwire's native core. Use weightwire.net and weightwire.staging instead.";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ww::OsError& e) {
            // OSError(errno, msg) picks the errno's subclass (TimeoutError, ConnectionRefusedError…).
            py::object exc = py::reinterpret_steal<py::object>(
                PyObject_CallFunction(PyExc_OSError, "is", e.error_number(), e.what()));
            if (exc) PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
        } catch (const ww::OutOfMemory& e) {
            PyErr_SetString(PyExc_MemoryError, e.what());
        } catch (const ww::BufferInUse& e) {
            PyErr_SetString(PyExc_BufferError, e.what());
        } catch (const ww::IntegrityFailure& e) {
            // weightwire.errors is pure Python and already imported by whoever calls into us.
            py::object cls = py::module_::import("weightwire.errors").attr("IntegrityError");
            PyErr_SetString(cls.ptr(), e.what());
        }
    });

    m.def("format_endpoint", &ww::format_endpoint, "host"_a, "port"_a);

    py::class_<ww::Listener>(m, "Listener")
        .def(py::init<const std::string&, int, int>(), "host"_a, "port"_a, "backlog"_a)
        .def_property_readonly("family", [](py::handle self) { return native<ww::Listener>(self).local().family; })
        .def_property_readonly("host", [](py::handle self) { return native<ww::Listener>(self).local().host; })
        .def_property_readonly("port", [](py::handle self) { return native<ww::Listener>(self).local().port; })
        .def_property_readonly("closed", checked_method<ww::Listener, &ww::Listener::closed>())
        .def("fileno", checked_method<ww::Listener, &ww::Listener::fd>())
        .def(
            "accept",
            [](py::handle self, double timeout_s) {
                ww::Listener& listener = native<ww::Listener>(self);
                ww::Accepted accepted;
                {
                    // Safe without the GIL: the Listener guards its fd with its own mutex, and
                    // pybind11 keeps `self` alive for the length of the call.
                    py::gil_scoped_release nogil;
                    accepted = listener.accept(timeout_s, kInterrupt);
                }
                return accepted_tuple(accepted);
            },
            "timeout_s"_a, "Wait for one connection: (fd, family, peer_host, peer_port).")
        .def("close", checked_method<ww::Listener, &ww::Listener::close>());

    m.def(
        "connect_tcp",
        [](const std::string& host, int port, double timeout_s) {
            // Safe without the GIL: only the copied arguments are used.
            py::gil_scoped_release nogil;
            return ww::connect_tcp(host, port, timeout_s, kInterrupt);
        },
        "host"_a, "port"_a, "timeout_s"_a);
    m.def("route_source", &ww::route_source, "host"_a);
    m.def("list_interfaces", [] {
        py::list out;
        for (const auto& i : ww::list_interfaces()) {
            out.append(py::make_tuple(i.name, i.family, i.address, i.is_loopback, i.is_up));
        }
        return out;
    });

    m.def("page_size", &ww::page_size);
    m.def("default_copy_threads", &ww::default_copy_threads);
    m.def("cuda_runtime_path", [] {
        const std::string path = ww::cuda_runtime_path();
        return path.empty() ? py::object(py::none()) : py::object(py::str(path));
    });
    m.def(
        "crc32c",
        [](py::handle data, std::uint32_t crc) {
            HeldBuffer in(data, PyBUF_SIMPLE, "data");
            // Safe without the GIL: the buffer stays exported until this returns.
            py::gil_scoped_release nogil;
            return ww::crc32c(in.data(), in.size(), crc);
        },
        "data"_a, "crc"_a = 0, "CRC32C of a contiguous buffer, continuing from crc.");
    m.def("_crc32c_implementations", &ww::crc32c_implementations,
          "The CRC32C implementations this CPU runs, fastest first (for tests).");
    m.def(
        "_crc32c_with",
        [](const std::string& implementation, py::handle data, std::uint32_t crc) {
            HeldBuffer in(data, PyBUF_SIMPLE, "data");
            py::gil_scoped_release nogil;
            return ww::crc32c_with(implementation, in.data(), in.size(), crc);
        },
        "implementation"_a, "data"_a, "crc"_a = 0, "crc32c with one named implementation (for tests).");
    m.def("copy_into", &copy_into, "dst"_a, "dst_offset"_a, "src"_a, "threads"_a,
          "Copy the bytes of src into dst at dst_offset; returns the byte count.");

    auto host_buffer =
        py::class_<ww::HostBuffer>(m, "HostBuffer", py::buffer_protocol())
            .def(py::init([](long long nbytes, long long alignment, bool lock, bool register_cuda, bool shared) {
                     if (nbytes < 1) {
                         throw std::invalid_argument("nbytes must be >= 1, got " + std::to_string(nbytes));
                     }
                     const std::size_t align = non_negative(alignment, "alignment");
                     // Safe without the GIL: nothing Python is touched while pages are faulted in.
                     py::gil_scoped_release nogil;
                     return std::make_unique<ww::HostBuffer>(static_cast<std::size_t>(nbytes), align,
                                                             lock, register_cuda, shared);
                 }),
                 "nbytes"_a, py::kw_only(), "alignment"_a = static_cast<long long>(ww::page_size()),
                 "lock"_a = true, "register_cuda"_a = true, "shared"_a = false)
            .def_property_readonly("nbytes", checked_method<ww::HostBuffer, &ww::HostBuffer::size>())
            .def_property_readonly("alignment", checked_method<ww::HostBuffer, &ww::HostBuffer::alignment>())
            .def_property_readonly("locked", checked_method<ww::HostBuffer, &ww::HostBuffer::locked>())
            .def_property_readonly("cuda_registered", checked_method<ww::HostBuffer, &ww::HostBuffer::cuda_registered>())
            .def_property_readonly("pinned", [](py::handle self) {
                const ww::HostBuffer& b = buffer(self);
                return b.locked() || b.cuda_registered();
            })
            .def_property_readonly("exports", checked_method<ww::HostBuffer, &ww::HostBuffer::exports>())
            .def_property_readonly("closed", checked_method<ww::HostBuffer, &ww::HostBuffer::closed>())
            .def_property_readonly("address",
                                   [](py::handle self) {
                                       const ww::HostBuffer& b = buffer(self);
                                       if (b.closed()) throw std::invalid_argument("HostBuffer is closed");
                                       return reinterpret_cast<std::uintptr_t>(b.data());
                                   })
            .def("fileno",
                 [](py::handle self) {
                     const int fd = buffer(self).fd();
                     if (fd < 0) throw std::invalid_argument("only an open shared HostBuffer has a file descriptor");
                     return fd;
                 })
            .def("__len__", checked_method<ww::HostBuffer, &ww::HostBuffer::size>())
            .def("close", checked_method<ww::HostBuffer, &ww::HostBuffer::close>())
            .def("__enter__", [](py::object self) {
                buffer(self);
                return self;
            })
            .def("__exit__", [](py::handle self, py::args) { buffer(self).close(); })
            .def("__repr__", [](py::handle self) {
                const ww::HostBuffer& b = buffer(self);
                if (b.closed()) return std::string("<HostBuffer closed>");
                return "<HostBuffer nbytes=" + std::to_string(b.size()) + " locked=" +
                       (b.locked() ? "True" : "False") + " cuda_registered=" +
                       (b.cuda_registered() ? "True" : "False") + " exports=" + std::to_string(b.exports()) + ">";
            });
    auto* type = reinterpret_cast<PyTypeObject*>(host_buffer.ptr());
    type->tp_as_buffer->bf_getbuffer = host_buffer_getbuffer;
    type->tp_as_buffer->bf_releasebuffer = host_buffer_releasebuffer;

    bind_transport(m);
}
