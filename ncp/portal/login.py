"""Login and logout routes: password then TOTP code, or the national identity provider.

Each step is audited (``hp-login``; failures with the reason, lock-outs as serious failures)
and counted for lock-outs (``ncp.portal.lockout``). A login under way lives in a session of its
own under the ``LOGIN_COOKIE`` (state ``login``, ``totp`` or ``oidc``) whose CSRF token the
forms carry; success replaces it with a new ``active`` session under the ``SESSION_COOKIE``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from starlette.exceptions import HTTPException

from ncp.audit.models import Action, Outcome
from ncp.portal import auditing
from ncp.portal.accounts import accept_totp, check_password, find_account
from ncp.portal.app import LOGIN_COOKIE, SESSION_COOKIE, Portal, clear_cookie, portal_of, set_cookie
from ncp.portal.i18n import from_accept_language
from ncp.portal.lockout import Blocked
from ncp.portal.oidc import OidcError
from ncp.portal.sessions import Hp, PortalSessionView, csrf_ok
from ncp.store.portal import HpAccount

LOCAL_ACR = "urn:ncp:acr:password+totp"
"""The portal's own authentication context class: something known (a password of at least 12
characters, Argon2id) and something held (a TOTP device). B's HP assertion carries it; a
national IdP's own ``acr`` (e.g. eIDAS ``http://eidas.europa.eu/LoA/high``) replaces it for an
HP who logs in there."""
LOCAL_AMR = ("pwd", "otp", "mfa")
"""RFC 8176 methods of the local login."""
REASONS = ("idle", "expired", "logged_out")


def router() -> APIRouter:
    api = APIRouter()
    api.add_api_route("/login", login_page, methods=["GET"])
    api.add_api_route("/login", login_submit, methods=["POST"])
    api.add_api_route("/login/totp", totp_page, methods=["GET"])
    api.add_api_route("/login/totp", totp_submit, methods=["POST"])
    api.add_api_route("/login/oidc", oidc_start, methods=["GET"])
    api.add_api_route("/login/oidc/callback", oidc_callback, methods=["GET"])
    api.add_api_route("/logout", logout, methods=["POST"])
    return api


def _source(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _login_session(portal: Portal, request: Request) -> tuple[PortalSessionView, str | None]:
    """The login under way (state ``login``), or a new one; the new token if one was made."""
    view = portal.session(request, LOGIN_COOKIE)
    if view is not None and view.state == "login":
        return view, None
    language = from_accept_language(
        request.headers.get("accept-language"), portal.settings.default_language
    )
    token, view = portal.store.open(
        "login",
        language=language,
        source=_source(request),
        replaces=view.id_hash if view is not None else None,
    )
    return view, token


def _show_login(
    portal: Portal,
    request: Request,
    *,
    status: int = 200,
    error: str | None = None,
    notice: str | None = None,
    username: str = "",
) -> Response:
    view, token = _login_session(portal, request)
    t = portal.translator(request, view)
    response = portal.render(
        request,
        "login.html",
        status=status,
        t=t,
        login_csrf=view.csrf_token,
        error=error,
        notice=notice,
        username=username,
        local=portal.settings.local_accounts,
        oidc_name=portal.oidc.settings.display_name if portal.oidc is not None else None,
        idle_minutes=portal.settings.idle_timeout_s // 60,
    )
    if token is not None:
        set_cookie(response, LOGIN_COOKIE, token, max_age=portal.settings.login_timeout_s)
    return response


def _blocked_message(portal: Portal, request: Request, blocked: Blocked) -> str:
    view = portal.session(request, LOGIN_COOKIE)
    t = portal.translator(request, view)
    key = "login.locked_account" if blocked.scope == "account" else "login.locked_source"
    return t(key, minutes=blocked.minutes_left(portal.clock()))


def _hp_of(account: HpAccount) -> Hp:
    return Hp(
        account_id=account.id,
        username=account.username,
        name=account.name,
        role_code=account.role_code,
        role_display=account.role_display,
        organisation=account.organisation,
        organisation_id=account.organisation_id,
        point_of_care=account.point_of_care,
        language=account.language,
    )


def login_page(request: Request, reason: str | None = None) -> Response:
    portal = portal_of(request)
    if portal.session(request) is not None:
        return RedirectResponse("/", status_code=303)
    notice = None
    if reason in REASONS:
        t = portal.translator(request)
        notice = t(f"login.{reason}", minutes=portal.settings.idle_timeout_s // 60)
    return _show_login(portal, request, notice=notice)


def _fail(
    portal: Portal,
    request: Request,
    *,
    username: str | None,
    step: str,
    reason: str,
    account: HpAccount | None,
) -> Blocked | None:
    """Count and audit one failed step; returns the lock-out it caused, audited as such."""
    blocked = portal.lockout.fail(username[:64] if username else None, _source(request))
    hp = _hp_of(account) if account is not None else None
    details: dict[str, Any] = {"step": step}
    if account is None and step == "password":
        details["account"] = "unknown user name"  # what was typed is not kept: it may be a password
    auditing.record(
        portal.node.auditor,
        request,
        Action.HP_LOGIN,
        outcome=Outcome.MINOR_FAILURE,
        reason=reason,
        hp=hp,
        details=details,
    )
    if blocked is not None:
        auditing.record(
            portal.node.auditor,
            request,
            Action.HP_LOGIN,
            outcome=Outcome.SERIOUS_FAILURE,
            reason=f"locked out ({blocked.scope}) until {blocked.until.isoformat()}",
            hp=hp,
            details={"step": step, "lockout": blocked.scope},
        )
    return blocked


def _check_csrf(view: PortalSessionView | None, token: str | None) -> None:
    if not csrf_ok(view, token):
        raise HTTPException(403, "the form's CSRF token is missing or not this session's")


def login_submit(
    request: Request,
    username: str = Form("", max_length=256),
    password: str = Form("", max_length=1024),
    csrf_token: str = Form("", max_length=128),
) -> Response:
    portal = portal_of(request)
    view = portal.session(request, LOGIN_COOKIE)
    _check_csrf(view if view is not None and view.state == "login" else None, csrf_token)
    assert view is not None
    if not portal.settings.local_accounts:
        raise HTTPException(403, "local accounts are disabled")
    t = portal.translator(request, view)
    username = username.strip()
    blocked = portal.lockout.check(username[:64], _source(request))
    if blocked is not None:
        auditing.record(
            portal.node.auditor,
            request,
            Action.HP_LOGIN,
            outcome=Outcome.SERIOUS_FAILURE,
            reason=f"refused while locked out ({blocked.scope})",
            details={"step": "password", "lockout": blocked.scope},
        )
        return _show_login(
            portal, request, status=429, error=_blocked_message(portal, request, blocked)
        )
    with portal.node.sessions() as session:
        account = find_account(session, username) if username else None
        if account is not None:
            session.expunge(account)
    usable = account is not None and account.active and account.totp_secret is not None
    if not check_password(account.password_hash if usable and account else None, password):
        blocked = _fail(
            portal,
            request,
            username=username,
            step="password",
            reason="wrong user name or password",
            account=account,
        )
        error = _blocked_message(portal, request, blocked) if blocked else t("login.failed")
        return _show_login(
            portal, request, status=429 if blocked else 401, error=error, username=username
        )
    assert account is not None
    token, _ = portal.store.open(
        "totp",
        language=account.language,
        source=_source(request),
        data={"account_id": account.id},
        replaces=view.id_hash,
    )
    response = RedirectResponse("/login/totp", status_code=303)
    set_cookie(response, LOGIN_COOKIE, token, max_age=portal.settings.login_timeout_s)
    return response


def _pending(portal: Portal, request: Request) -> tuple[PortalSessionView, HpAccount] | None:
    view = portal.session(request, LOGIN_COOKIE)
    if view is None or view.state != "totp":
        return None
    with portal.node.sessions() as session:
        account = session.get(HpAccount, view.data.get("account_id"))
        if account is None:
            return None
        session.expunge(account)
    return view, account


def totp_page(request: Request) -> Response:
    portal = portal_of(request)
    pending = _pending(portal, request)
    if pending is None:
        return RedirectResponse("/login?reason=expired", status_code=303)
    view, _ = pending
    return portal.render(
        request,
        "totp.html",
        t=portal.translator(request, view),
        login_csrf=view.csrf_token,
        error=None,
    )


def totp_submit(
    request: Request,
    code: str = Form("", max_length=32),
    csrf_token: str = Form("", max_length=128),
) -> Response:
    portal = portal_of(request)
    pending = _pending(portal, request)
    _check_csrf(pending[0] if pending else None, csrf_token)
    assert pending is not None
    view, account = pending
    t = portal.translator(request, view)
    blocked = portal.lockout.check(account.username, _source(request))
    if blocked is not None:
        portal.store.end(view.id_hash)
        auditing.record(
            portal.node.auditor,
            request,
            Action.HP_LOGIN,
            outcome=Outcome.SERIOUS_FAILURE,
            reason=f"refused while locked out ({blocked.scope})",
            hp=_hp_of(account),
            details={"step": "totp", "lockout": blocked.scope},
        )
        return _show_login(
            portal, request, status=429, error=_blocked_message(portal, request, blocked)
        )
    code = "".join(code.split())
    if not accept_totp(portal.node.sessions, account.id, code, portal.clock()):
        blocked = _fail(
            portal,
            request,
            username=account.username,
            step="totp",
            reason="wrong or reused TOTP code",
            account=account,
        )
        if blocked is not None:
            portal.store.end(view.id_hash)
            return _show_login(
                portal, request, status=429, error=_blocked_message(portal, request, blocked)
            )
        return portal.render(
            request,
            "totp.html",
            status=401,
            t=t,
            login_csrf=view.csrf_token,
            error=t("totp.failed"),
        )
    return _activate(portal, request, view, account, acr=LOCAL_ACR, amr=LOCAL_AMR, step="totp")


def _activate(
    portal: Portal,
    request: Request,
    login: PortalSessionView,
    account: HpAccount,
    *,
    acr: str,
    amr: tuple[str, ...],
    step: str,
    via_redirect: bool = False,
) -> Response:
    portal.lockout.succeed(account.username)
    token, view = portal.store.open(
        "active",
        language=account.language,
        source=_source(request),
        account_id=account.id,
        acr=acr,
        amr=amr,
        replaces=login.id_hash,
    )
    auditing.record(
        portal.node.auditor,
        request,
        Action.HP_LOGIN,
        hp=_hp_of(account),
        details={"step": step, "acr": acr, "amr": list(amr)},
    )
    if via_redirect:
        # Arrived by the provider's cross-site redirect: a SameSite=Strict cookie set now is
        # not sent on a redirect that chain started; a page of our own moves on same-site.
        response: Response = portal.render(request, "continue.html", session=view, target="/")
    else:
        response = RedirectResponse("/", status_code=303)
    set_cookie(response, SESSION_COOKIE, token, max_age=portal.settings.absolute_lifetime_s)
    clear_cookie(response, LOGIN_COOKIE)
    return response


def oidc_start(request: Request) -> Response:
    portal = portal_of(request)
    if portal.oidc is None:
        raise HTTPException(404)
    try:
        start = portal.oidc.start()
    except OidcError as exc:
        t = portal.translator(request)
        return _show_login(portal, request, status=503, error=t("oidc.refused", reason=exc.reason))
    old = portal.session(request, LOGIN_COOKIE)
    language = from_accept_language(
        request.headers.get("accept-language"), portal.settings.default_language
    )
    token, _ = portal.store.open(
        "oidc",
        language=language,
        source=_source(request),
        data={"state": start.state, "nonce": start.nonce, "verifier": start.verifier},
        replaces=old.id_hash if old is not None else None,
    )
    response = RedirectResponse(start.url, status_code=303)
    set_cookie(response, LOGIN_COOKIE, token, max_age=portal.settings.login_timeout_s)
    return response


def oidc_callback(
    request: Request,
    code: str | None = None,
    state: str | None = None,
    error: str | None = None,
) -> Response:
    portal = portal_of(request)
    if portal.oidc is None:
        raise HTTPException(404)
    view = portal.session(request, LOGIN_COOKIE)
    t = portal.translator(request, view)
    if view is None or view.state != "oidc":
        return _show_login(portal, request, status=400, error=t("login.expired"))
    source_block = portal.lockout.check(None, _source(request))
    if source_block is not None:
        portal.store.end(view.id_hash)
        return _show_login(
            portal, request, status=429, error=_blocked_message(portal, request, source_block)
        )
    try:
        if error is not None or not code or not state:
            raise OidcError(f"the provider answered {error[:64]!r}" if error else "no code")
        identity = portal.oidc.finish(
            code=code[:2048],
            state=state[:256],
            expected_state=str(view.data.get("state", "")),
            nonce=str(view.data.get("nonce", "")),
            verifier=str(view.data.get("verifier", "")),
        )
    except OidcError as exc:
        portal.store.end(view.id_hash)
        blocked = _fail(
            portal, request, username=None, step="oidc", reason=exc.reason, account=None
        )
        message = (
            _blocked_message(portal, request, blocked)
            if blocked
            else t("oidc.refused", reason=exc.reason)
        )
        return _show_login(portal, request, status=429 if blocked else 401, error=message)
    with portal.node.sessions() as session:
        account = session.execute(
            select(HpAccount).where(HpAccount.oidc_subject == identity.subject)
        ).scalar_one_or_none()
        if account is not None:
            session.expunge(account)
    if account is None or not account.active:
        portal.store.end(view.id_hash)
        _fail(
            portal,
            request,
            username=None,
            step="oidc",
            reason="no active account linked to the provider's subject",
            account=None,
        )
        return _show_login(portal, request, status=403, error=t("oidc.unknown_hp"))
    blocked = portal.lockout.check(account.username, _source(request))
    if blocked is not None:
        portal.store.end(view.id_hash)
        return _show_login(
            portal, request, status=429, error=_blocked_message(portal, request, blocked)
        )
    return _activate(
        portal,
        request,
        view,
        account,
        acr=identity.acr,
        amr=identity.amr or ("oidc",),
        step="oidc",
        via_redirect=True,
    )


def logout(request: Request, csrf_token: str = Form("", max_length=128)) -> Response:
    portal = portal_of(request)
    view = portal.session(request)
    _check_csrf(view, csrf_token)
    assert view is not None and view.hp is not None
    portal.store.end(view.id_hash)
    if portal.thumbnails is not None:
        portal.thumbnails.forget(view.id_hash)
    auditing.record(
        portal.node.auditor,
        request,
        Action.HP_LOGOUT,
        hp=view.hp,
        reason="logout",
        details={"acr": view.acr},
    )
    response = RedirectResponse("/login?reason=logged_out", status_code=303)
    clear_cookie(response, SESSION_COOKIE)
    return response
