"""The HTTP layer: a FastAPI app over one ``Engine`` (JSON API + the single page at ``/``).

Status codes: 404 for an id, video id or route the index does not have (never a file outside
it), 422 for a bad parameter (one ``detail`` line), 400 for an upload that is not an image or a
``Host`` header that is not one of the allowed names, 413 for one over ``MAX_UPLOAD`` bytes or
``MAX_PIXELS`` pixels, 401 for a missing or wrong token when one is set, 409 for a basket made on
another index (never exported against this one).
"""

import io
import re
import secrets
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from mergeseek.errors import ConfigError, InputError, MergeseekError
from mergeseek.retrieval.submission import MAX_ROWS
from mergeseek.serve.engine import MAX_K, Engine, NotFound, submission_csv

MAX_UPLOAD = 20 * 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file
MAX_PIXELS = 64_000_000  # JPEG uploads: decoded at a reduced scale (DCT scaling), never at full size
MAX_DECODED_PIXELS = 24_000_000  # other formats decode whole: above this they are refused (413) from the header
QUERY_SIDE = 1024  # an upload is scaled to at most this side before it is kept (the encoder needs 224)
DECODE_SLOTS = 2  # uploads decoded at the same time; more wait their turn
_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
MAX_NEIGHBOURS = 50
MAX_BASKET = 1000
PAGE = Path(__file__).with_name("static") / "index.html"
_ID = re.compile(r"^[0-9]{1,18}\Z")  # \Z: "$" would also match before a final newline
# The page loads nothing from the network: only this server, inline code and local blobs.
CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' blob: data:; media-src 'self'; connect-src 'self'; form-action 'none'; base-uri 'none'; "
       "frame-ancestors 'none'")


class StaleBasket(Exception):
    """A basket made on another index (HTTP 409): never exported against this one."""


def _refs(items) -> list:
    return [[(f.video_id, f.frame_idx) for f in item] for item in items]


class UploadRefused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _frame_id(raw: str) -> int:
    """A frame id from a path segment; anything that is not a plain non-negative integer is unknown."""
    if not _ID.match(raw):
        raise NotFound(f"no frame with id {raw[:40]!r} in this index")
    return int(raw)


def _file_name(query_id: Optional[str]) -> str:
    """``{query_id}.csv`` (``submission.csv`` without one); 422 for an id that is not a plain file name."""
    from mergeseek.retrieval.submission import query_file_name

    return "submission.csv" if query_id is None or query_id == "" else query_file_name(query_id)


def _open_image(data: bytes):
    """The upload as an RGB image of at most ``QUERY_SIDE`` pixels a side.

    Memory stays bounded whatever the file claims: sizes come from the header before any pixel is
    decoded; a JPEG decodes straight at a reduced scale (PIL's draft mode), anything else is
    refused above ``MAX_DECODED_PIXELS``; at most ``DECODE_SLOTS`` uploads decode at once, and
    the heap is handed back to the OS after a large decode.
    """
    from PIL import Image

    from mergeseek.indexing.formats import heif_ready, to_rgb8

    heif_ready()  # an iPhone photo (HEIC) opens when pillow-heif is installed
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h, fmt = im.width, im.height, im.format
            if w * h > MAX_PIXELS or (fmt != "JPEG" and w * h > MAX_DECODED_PIXELS):
                limit = MAX_PIXELS if fmt == "JPEG" else MAX_DECODED_PIXELS
                raise UploadRefused(413, f"image of {w}x{h} pixels is too large; send at most {limit} pixels"
                                    + ("" if fmt == "JPEG" else " (or a JPEG)"))
            im.verify()
        with _decode_slots:
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (QUERY_SIDE, QUERY_SIDE))  # decode at 1/2, 1/4 or 1/8 scale
                im.thumbnail((QUERY_SIDE, QUERY_SIDE))
                out = Image.fromarray(to_rgb8(im))  # upright, transparency over white: as indexing reads it
            if w * h > 4_000_000:
                from mergeseek.runtime import release_freed_memory

                release_freed_memory()
            return out
    except UploadRefused:
        raise
    except Exception:  # PIL raises many types for bad data
        raise UploadRefused(400, "the upload is not an image that can be read; send a JPEG, PNG or WebP file") from None



async def _read_limited(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadRefused(413, f"upload of {int(declared)} bytes is over the {MAX_UPLOAD // 2**20} MB limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise UploadRefused(413, f"upload is over the {MAX_UPLOAD // 2**20} MB limit")
    return bytes(body)


class FrameRef(BaseModel):
    """A frame by what it is, not by an id: valid in any index that holds it."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422 naming it, never silently ignored

    video_id: str = Field(..., min_length=1, max_length=500)
    frame_idx: StrictInt = Field(..., ge=0)


class Basket(BaseModel):
    """``POST /api/export.csv`` body: the chosen frames in order, as ``items`` (each a list of frames,
    one per event: ``[{video_id, frame_idx}]``) with the ``index`` uid they were chosen on (``/api/health``),
    or as ``ids`` of this index (a pair [first, then] for a temporal hit)."""

    ids: Optional[List[Union[StrictInt, List[StrictInt]]]] = Field(None, min_length=1, max_length=MAX_BASKET)
    items: Optional[List[List[FrameRef]]] = Field(None, min_length=1, max_length=MAX_BASKET)
    index: Optional[str] = Field(None, max_length=64)
    query_id: Optional[str] = Field(None, max_length=100)
    answer: Optional[str] = Field(None, max_length=500)  # a QA answer: rows become video_id,frame_idx,answer

    model_config = ConfigDict(extra="forbid")


class SearchBody(BaseModel):
    """``POST /api/search``: events in order (one or more texts), feedback marks, one video."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422 naming it, never silently ignored

    events: List[str] = Field(default_factory=list, max_length=16)
    within: Union[float, List[float]] = 30.0
    k: int = Field(20, ge=1, le=1000)
    per_video: bool = False
    like: List[StrictInt] = Field(default_factory=list, max_length=200)
    unlike: List[StrictInt] = Field(default_factory=list, max_length=200)
    video: Optional[str] = Field(None, min_length=1, max_length=500)
    object: Optional[str] = Field(None, max_length=200)  # AI Challenge: only keyframes with this detected object


def host_name(header: str) -> str:
    """The host of a ``Host`` header, lower-case, without port or IPv6 brackets ('' if malformed)."""
    h = header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 and (end == len(h) - 1 or h[end + 1] == ":") else ""
    if h.count(":") == 1:
        h, _, port = h.partition(":")
        if not port.isdigit():
            return ""
    elif h.count(":") > 1:
        return ""  # an IPv6 address must be bracketed in a Host header
    return h.rstrip(".")


def _host_allowed(name: str, allowed: frozenset, any_ip: bool) -> bool:
    if name in allowed:
        return True
    if any_ip:  # a wildcard bind: any address literal (DNS rebinding needs a name)
        import ipaddress

        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False
    return False


def create_app(engine: Engine, token: Optional[str] = None, allowed_hosts: Optional[Sequence[str]] = None):
    """The ASGI app.

    Args:
        token: required on every request (``Authorization: Bearer`` or ``?token=``).
        allowed_hosts: host names the ``Host`` header may carry (others get 400, before any other
            check: a page under a foreign name that resolves to this machine, DNS rebinding,
            cannot read the API); ``0.0.0.0`` / ``::`` in it also accepts any address literal.
            None: no check (a caller mounting the app behind its own proxy). ``run_server``
            always passes the bound host, ``localhost``, ``127.0.0.1``, ``::1`` and ``--allowed-host``.
    """
    app = FastAPI(title="mergeseek", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(_known_query_only)])
    app.state.engine = engine
    _add_guard(app, token, allowed_hosts)
    _add_error_handlers(app)
    _add_page_routes(app, engine)
    _add_search_routes(app, engine)
    _add_frame_routes(app, engine)
    _add_export_routes(app, engine)
    return app


def _known_query_only(request: Request) -> None:
    """A query parameter the route does not take (``?video=`` on ``/api/search``, a typo of ``per_video``)
    is a 422 naming it and the ones the route takes: ignored, it would answer a different question.
    The page (``/``) keeps its own state in its query string and is not checked."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None or not request.url.path.startswith("/api/"):
        return
    known = {p.alias for p in dependant.query_params} | {"token"}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        takes = ", ".join(sorted(known - {"token"})) or "none"
        raise InputError(f"unknown query parameter(s) {', '.join(u[:40] for u in unknown[:5])}; {request.url.path} takes: {takes}")


def _add_guard(app: FastAPI, token: Optional[str], allowed_hosts: Optional[Sequence[str]]) -> None:
    """Every request: the ``Host`` check first, then the token; every answer: the safety headers."""
    allowed = None if allowed_hosts is None else frozenset(host_name(h if ":" not in h or h.startswith("[") else f"[{h}]")
                                                           for h in allowed_hosts)
    any_ip = allowed is not None and bool({"0.0.0.0", "::"} & allowed)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if allowed is not None:
            name = host_name(request.headers.get("host", ""))
            if not name or not _host_allowed(name, allowed, any_ip):
                shown = request.headers.get("host", "")[:80]
                return JSONResponse({"detail": f"Host {shown!r} is not served here (a page under another name must "
                                     "not read this server); open it by the address it listens on, or start it "
                                     "with --allowed-host NAME"}, status_code=400)
        if token is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else request.query_params.get("token", "")
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "missing or wrong token; send Authorization: Bearer TOKEN or ?token=TOKEN"},
                                    status_code=401)
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFound)
    async def not_found(request, exc: NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(MergeseekError)
    async def failed(request, exc: MergeseekError):
        # a bad query or option is the client's (422); anything else (a damaged shard, ...) is the server's
        status = 422 if isinstance(exc, (InputError, ConfigError)) else 500
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(StaleBasket)
    async def stale(request, exc: StaleBasket):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(UploadRefused)
    async def refused(request, exc: UploadRefused):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body"))
            parts.append(f"{loc or 'request'}: {e.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)


def _add_page_routes(app: FastAPI, engine: Engine) -> None:
    page = PAGE.read_text(encoding="utf-8").replace("%MAX_ROWS%", str(MAX_ROWS))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    @app.get("/api/health")
    def health():
        return engine.health()


def _add_search_routes(app: FastAPI, engine: Engine) -> None:
    K = Query(20, ge=1, le=MAX_K, description="number of results")

    def hits_response(results: list, started: float, pairs: bool = False, kind: Optional[str] = None, **extra) -> dict:
        return {"kind": kind or ("pairs" if pairs else "frames"), **extra,
                "took_ms": round((time.perf_counter() - started) * 1e3, 2), "hits": [engine.result_dict(r) for r in results]}

    @app.get("/api/search")
    def search(q: str = Query(..., min_length=1, max_length=2000), k: int = K,
               then: Optional[str] = Query(None, max_length=2000), within: float = Query(30.0, gt=0, le=86400),
               per_video: bool = False):
        t0 = time.perf_counter()
        results = engine.search(q, k=k, then=then, within=within, per_video=per_video)
        pairs = then is not None and bool(then.strip())
        return hits_response(results, t0, pairs=pairs, query=q, then=then if pairs else None)

    @app.post("/api/search")
    def search_session(body: SearchBody):
        t0 = time.perf_counter()
        if any(len(e) > 2000 for e in body.events):
            raise InputError("an event text is over 2000 characters")
        results = engine.query(body.events, within=body.within, k=body.k, per_video=body.per_video, like=body.like,
                               unlike=body.unlike, video=body.video, object_name=body.object)
        kind = "chains" if len(body.events) > 2 else "pairs" if len(body.events) == 2 else "frames"
        return hits_response(results, t0, kind=kind, events=body.events, like=body.like, unlike=body.unlike,
                             video=body.video, object=body.object)

    @app.post("/api/search/image")
    async def search_image(request: Request, k: int = K, per_video: bool = False):
        t0 = time.perf_counter()
        data = await _upload_bytes(request)
        image = await run_in_threadpool(_open_image, data)  # decoding a large image must not stall other requests
        results = await run_in_threadpool(engine.search_image, image, k, per_video)
        return hits_response(results, t0, query="image")

    @app.get("/api/similar/{frame}")
    def similar(frame: str, k: int = K, per_video: bool = False):
        t0 = time.perf_counter()
        results = engine.similar(_frame_id(frame), k=k, per_video=per_video)
        return hits_response(results, t0, query=f"similar:{frame}")


async def _upload_bytes(request: Request) -> bytes:
    """The uploaded image's bytes: a multipart field ``file`` (or ``image``) or a raw image body."""
    body = await _read_limited(request, MAX_UPLOAD + MULTIPART_SLACK)
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        upload = form.get("file") or form.get("image")
        if not isinstance(upload, UploadFile):
            raise UploadRefused(400, "no image in the upload; send it as the multipart field 'file'")
        data = await upload.read()
        await form.close()
    elif ctype.startswith("image/") or ctype.startswith("application/octet-stream"):
        data = body
    else:
        raise UploadRefused(400, "send the image as multipart/form-data (field 'file') or as an image/* body")
    if len(data) > MAX_UPLOAD:
        raise UploadRefused(413, f"upload is over the {MAX_UPLOAD // 2**20} MB limit")
    if not data:
        raise UploadRefused(400, "the upload is empty; send a JPEG, PNG or WebP file")
    return data


def _add_frame_routes(app: FastAPI, engine: Engine) -> None:
    """Frames and files, reached by the ids and video ids the index recorded only."""

    @app.get("/api/thumb/{frame}")
    def thumb(frame: str):
        data = engine.catalog.thumb(_frame_id(frame))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/neighbors/{frame}")
    def neighbors(frame: str, n: int = Query(6, ge=0, le=MAX_NEIGHBOURS)):
        before, hit, after = engine.catalog.neighbours(_frame_id(frame), n)
        return {"id": hit.id, "video_id": hit.video_id, "hit": engine.hit_dict(hit),
                "before": [engine.hit_dict(h) for h in before], "after": [engine.hit_dict(h) for h in after]}

    @app.get("/api/video/{video_id:path}")
    def video(video_id: str):
        v = engine.catalog.video(video_id)  # a dict lookup: a request never names a path
        return FileResponse(v.path, media_type=v.media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/clip/{video_id:path}")
    def clip(video_id: str, start: float = Query(0.0, ge=0, le=10_000_000)):
        """A preview of a video the browser cannot play (serve/clips.py): an H.264 MP4 from ``start``."""
        v = engine.catalog.video(video_id)  # the indexed file, still unchanged, or a 404
        path = engine.clips.clip(v.path, v.sig, start)
        return FileResponse(path, media_type="video/mp4", headers={"Cache-Control": "private, max-age=3600"})


def _add_export_routes(app: FastAPI, engine: Engine) -> None:
    """Submission files (``retrieval.submission``'s format) of a search or of the basket."""

    def csv_response(results: list, query_id: Optional[str], answer: Optional[str] = None) -> Response:
        name = _file_name(query_id)
        text, n = submission_csv(results, answer)
        return Response(text, media_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="{name}"', "X-Rows": str(n)})

    @app.get("/api/export.csv")
    def export_search(q: str = Query(..., min_length=1, max_length=2000),
                      k: int = Query(MAX_ROWS, ge=1, le=MAX_ROWS),
                      then: Optional[str] = Query(None, max_length=2000), within: float = Query(30.0, gt=0, le=86400),
                      per_video: bool = False, query_id: Optional[str] = Query(None, max_length=100),
                      answer: Optional[str] = Query(None, max_length=500)):
        _file_name(query_id)  # a bad name fails before the search runs
        return csv_response(engine.search(q, k=k, then=then, within=within, per_video=per_video), query_id, answer)

    @app.post("/api/export.csv")
    def export_basket(basket: Basket):
        _file_name(basket.query_id)
        if (basket.ids is None) == (basket.items is None):
            raise InputError("give the basket as items ([{video_id, frame_idx}] per row, with its index) or as ids")
        if basket.items is not None:
            _same_index(basket.index)
            return csv_response(engine.rows_for_items(_refs(basket.items)), basket.query_id, basket.answer)
        return csv_response(engine.rows_for(basket.ids), basket.query_id, basket.answer)

    @app.post("/api/basket/verify")
    def verify_basket(basket: Basket):
        """Each item as this index holds it (thumbnail, time) or null, and whether the basket is stale."""
        mine = engine.identity()
        stale = basket.index is not None and basket.index != mine["uid"]
        rows = []
        for item in _refs(basket.items or []):
            found = [engine.catalog.find(v, f) for v, f in item]
            rows.append({"frames": [None if r is None else engine.hit_dict(engine.catalog.hit(r)) for r in found],
                         "ok": all(r is not None for r in found) and not stale})
        return {"index": mine, "basket_index": basket.index, "stale": stale, "rows": rows}

    def _same_index(uid: Optional[str]) -> None:
        mine = engine.identity()
        if uid is None:
            raise InputError("a basket of items must say which index it was made on (index: the uid of /api/health)")
        if uid != mine["uid"]:
            raise StaleBasket(f"this basket was made on another index (uid {uid[:16]}); this server serves "
                              f"{mine['name']} (uid {mine['uid']}, {mine['model']}): it is not exported here. "
                              "Serve that index again, or check the rows in the basket view and start a new basket")
