"""Voice library over REST: ``POST /voices`` (multipart), ``GET /voices``,
``GET /voices/{id}`` (``?export=true`` for the file), ``DELETE /voices/{id}``,
``POST /voices/rebuild`` (every voice made for another model, remade for this one).

A ``voice_id`` with a trailing ``.pth`` names the same voice. Uploads take
one file exported by this project, or one or more reference recordings, all
in ``file`` fields.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from ..errors import InvalidInput, excerpt
from ..reference import MAX_FILE_BYTES
from ..schemas import is_voice_id
from ..service import JobSummary
from ..voices import MAX_VOICE_FILE_BYTES
from .app import State, read_in_time, require_key
from .routes_speech import strip_pth

router = APIRouter(dependencies=[Depends(require_key)])

MAX_FILES = 10
# No file of an upload may be larger: a reference clip or an exported voice file. Checked
# on the parsed form (spooled to disk) before any file is read into memory.
MAX_UPLOAD_FILE_BYTES = max(MAX_FILE_BYTES, MAX_VOICE_FILE_BYTES)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def checked_id(voice_id) -> str:
    voice_id = strip_pth(voice_id)
    if not is_voice_id(voice_id):
        raise InvalidInput("voice_id: must be 1-64 letters, digits, '_' or '-', starting with a "
                           "letter or digit")
    return voice_id


def form_flag(value, name: str) -> bool:
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidInput(f"{name}: must be true or false")


async def _off_loop(function, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: function(*args, **kwargs))


def _log(request: Request, action: str, voice: str, outcome: str = "ok") -> None:
    from .app import log

    log.info(JobSummary(request.scope.get("state", {}).get("request_id", "-"), action=action,
                        voice=voice, outcome=outcome).line())


@router.post("/voices", status_code=201)
async def upload_voice(request: Request):
    core: State = request.app.state.core
    service = core.require_service()
    try:
        form = await read_in_time(core.settings, request.form(max_files=MAX_FILES, max_fields=10))
    except (MultiPartException, StarletteHTTPException) as exc:
        # Malformed multipart, too many files or fields, a field too large: the client's fault.
        # (Starlette raises its own HTTPException for these inside an app.)
        problem = getattr(exc, "message", None) or getattr(exc, "detail", "")
        raise InvalidInput(f"the body must be multipart/form-data with 'file' and 'voice_id' "
                           f"({excerpt(str(problem), 80)})") from None
    try:
        voice_id = checked_id(form.get("voice_id"))
        overwrite = form_flag(form.get("overwrite"), "overwrite")
        rebuild = form_flag(form.get("rebuild"), "rebuild")
        uploads = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
        if not uploads:
            raise InvalidInput("file: give one voice file or one or more reference recordings")
        labels = [f"file[{i}]" if len(uploads) > 1 else "file" for i in range(len(uploads))]
        for upload, label in zip(uploads, labels):
            if upload.size is not None and upload.size > MAX_UPLOAD_FILE_BYTES:
                raise InvalidInput(f"{label} is {upload.size} bytes; a reference recording may "
                                   f"be {MAX_FILE_BYTES} bytes, a voice file {MAX_VOICE_FILE_BYTES}")
        async with core.uploads:  # one upload's files in memory at a time
            files = [await f.read() for f in uploads]
            metadata = await _off_loop(service.upload_voice_files, voice_id, files, labels=labels,
                                       overwrite=overwrite, rebuild=rebuild)
    finally:
        await form.close()
    _log(request, "upload_voice", voice_id)
    return JSONResponse({**metadata, "message": "Voice uploaded successfully."}, status_code=201)


@router.post("/voices/rebuild")
async def rebuild_voices(request: Request):
    service = request.app.state.core.require_service()
    result = await _off_loop(service.rebuild_voices)
    _log(request, "rebuild_voices", "-")
    return result


@router.get("/voices")
async def list_voices(request: Request):
    service = request.app.state.core.require_service()
    return {"voices": await _off_loop(service.voice_ids)}


@router.get("/voices/{voice_id}")
async def get_voice(request: Request, voice_id: str, export: str = "false"):
    service = request.app.state.core.require_service()
    voice_id = checked_id(voice_id)
    if not form_flag(export, "export"):
        from ..schemas import GetVoiceRequest

        return await _off_loop(service.get_voice,
                               GetVoiceRequest(action="get_voice", voice_id=voice_id))
    data, _ = await _off_loop(service.export_voice, voice_id)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{voice_id}.pth"'})


@router.delete("/voices/{voice_id}")
async def delete_voice(request: Request, voice_id: str):
    from ..schemas import DeleteVoiceRequest

    service = request.app.state.core.require_service()
    voice_id = checked_id(voice_id)
    await _off_loop(service.delete_voice, DeleteVoiceRequest(action="delete_voice", voice_id=voice_id))
    _log(request, "delete_voice", voice_id)
    return {"message": f"Voice '{voice_id}' deleted successfully."}
